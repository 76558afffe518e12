"""Decode + display normalization on generated and real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian

from batchscan.ingest.dicom import (
    FALLBACK_PERCENTILES,
    decode_record,
    normalize,
    read_display_image,
)
from batchscan.ingest.header import StageOptions, read_header
from batchscan.ingest.preprocess import preprocess
from batchscan.ingest.records import ImageRecord
from batchscan.synth import (
    LOSSLESS_SYNTAXES,
    LOSSY_SYNTAXES,
    RadiographSpec,
    chest_phantom,
    write_radiograph,
)
from tests.conftest import real_file


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return chest_phantom((300, 260), seed=11, opacity=0.6)


def _tensor(path: Path) -> np.ndarray:
    return preprocess(read_display_image(str(path)).pixels)


@pytest.mark.parametrize("bits", [12, 15, 16])
def test_lossless_syntaxes_give_identical_tensors(tmp_path: Path, picture, bits: int) -> None:
    tensors = {}
    for syntax in LOSSLESS_SYNTAXES:
        spec = RadiographSpec(transfer_syntax=syntax, bits_stored=bits)
        tensors[syntax.name] = _tensor(write_radiograph(tmp_path / syntax, picture, spec))
    reference = tensors.pop(ExplicitVRLittleEndian.name)
    for name, tensor in tensors.items():
        assert np.array_equal(tensor, reference), name


@pytest.mark.parametrize("syntax", LOSSY_SYNTAXES, ids=lambda s: s.name)
def test_lossy_syntaxes_stay_close(tmp_path: Path, picture, syntax) -> None:
    reference = _tensor(write_radiograph(tmp_path / "ref", picture, RadiographSpec(bits_stored=8)))
    lossy = _tensor(
        write_radiograph(
            tmp_path / "x", picture, RadiographSpec(transfer_syntax=syntax, bits_stored=8)
        )
    )
    assert np.abs(lossy - reference).mean() < 0.01


@pytest.mark.parametrize("window", [None, (2048.0, 4096.0), (1500.0, 2500.0)])
def test_monochrome1_equals_monochrome2(tmp_path: Path, picture, window) -> None:
    m2 = write_radiograph(tmp_path / "m2", picture, RadiographSpec(window=window))
    # MONOCHROME1 stores the inverted picture; its window is mirrored accordingly
    mirrored = None if window is None else (4095 - window[0], window[1])
    m1 = write_radiograph(
        tmp_path / "m1", picture, RadiographSpec(photometric="MONOCHROME1", window=mirrored)
    )
    # equal up to the rounding of stored values: rint(4095 x) vs 4095 - rint(4095 (1 - x))
    assert np.abs(_tensor(m1) - _tensor(m2)).max() <= 1e-3


@pytest.mark.parametrize(
    ("a", "b"), [("RG1_UNCR.dcm", "RG1_J2KR.dcm"), ("RG1_UNCI.dcm", "RG1_J2KI.dcm")]
)
def test_rg1_pairs_give_identical_tensors(a: str, b: str) -> None:
    assert np.array_equal(_tensor(real_file(a)), _tensor(real_file(b)))


def test_rg1_is_a_chest_with_dark_lungs() -> None:
    """RG1 is MONOCHROME1: after inversion its lung fields are darker than the mediastinum."""
    display = read_display_image(str(real_file("RG1_UNCR.dcm"))).pixels
    rows, cols = display.shape
    lung = display[rows // 3 : rows // 2, cols // 5 : cols // 3].mean()
    mediastinum = display[rows // 3 : rows // 2, cols // 2 - 40 : cols // 2 + 40].mean()
    assert lung < mediastinum


def _dataset(arr: np.ndarray, **attrs) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = attrs.pop("BitsStored", 12)
    ds.PixelRepresentation = int(arr.dtype.kind == "i")
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def test_window_rescale_and_signed_pixels() -> None:
    arr = np.array([[-1000, 0], [40, 1000]], dtype=np.int16)
    ds = _dataset(arr, RescaleSlope=1, RescaleIntercept=-24, WindowCenter=16, WindowWidth=81)
    out = normalize(arr, ds)
    assert out.voi_source == "window"
    assert out.pixels[0, 0] == 0.0 and out.pixels[1, 1] == 1.0
    assert 0.0 < out.pixels[1, 0] < 1.0  # 40 - 24 = 16: the window centre
    assert abs(out.pixels[1, 0] - 0.5) < 0.02


def test_voi_lut_sequence_is_preferred() -> None:
    record = ImageRecord(path="v", abs_path=str(real_file("vlut_04.dcm")))
    read_header(record, StageOptions(all_modalities=True))
    image = decode_record(record, StageOptions(all_modalities=True))
    assert image is not None and image.voi_source == "voi_lut"
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0


def test_fallback_window_keeps_padding_in_its_sample_as_dcmtk_does() -> None:
    """DCMTK's histogram window is the same with and without Pixel Padding Value (measured,
    jobs/experiments/window_check.py); padding is shown black either way."""
    arr = np.full((100, 100), 500, dtype=np.uint16)
    arr[:, :50] = np.linspace(1000, 2000, 50, dtype=np.uint16)
    arr[0, 0] = 4095  # one hot pixel: the percentile window is not dragged by it
    arr[90:, :] = 0
    out = normalize(arr, _dataset(arr, PixelPaddingValue=0))
    assert out.voi_source == "percentile"
    assert out.pixels[95, 10] == 0.0  # padding shown black
    plain = normalize(arr, _dataset(arr))
    assert np.allclose(out.pixels, plain.pixels)
    low, high = np.percentile(arr, FALLBACK_PERCENTILES)
    assert low == 0 and abs(out.pixels[50, 70] - (500 - low) / (high - low)) < 0.02


def _padded_ct(n: int = 256) -> np.ndarray:
    """A windowless CT slice stored signed, -2000 outside a circular field of view."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[:n, :n] / (n - 1) * 2 - 1
    hu = np.full((n, n), -1000.0)  # air inside the field of view
    body = (x / 0.8) ** 2 + (y / 0.62) ** 2 < 1
    hu[body] = 40
    for cx in (-0.38, 0.38):
        hu[((x - cx) / 0.28) ** 2 + (y / 0.42) ** 2 < 1] = -850
    stored = np.rint(hu + rng.normal(0, 12, hu.shape) + 1024).astype(np.int16)
    stored[x**2 + y**2 > 0.98] = -2000
    return stored


def test_padded_signed_windowless_ct_is_windowed_where_dcmtk_windows_it() -> None:
    """Regression: leaving padding out of the window's sample moved a padded CT's display far
    from DCMTK's (dcm2pnm +Wh 1: the 0.5/99.5 percentiles of all stored values; on NEMA
    WG04 CT1 the median went 0.82 -> 0.56). The reference here is that window, computed on
    the full-resolution pixels."""
    arr = _padded_ct()
    ds = _dataset(arr, RescaleSlope=1, RescaleIntercept=-1024, PixelPaddingValue=-2000)
    out = normalize(arr, ds)
    assert out.voi_source == "percentile"
    hu = arr.astype(np.float64) - 1024
    low, high = np.percentile(hu, FALLBACK_PERCENTILES)
    assert low == -3024  # padding is in DCMTK's histogram
    reference = np.clip((hu - low) / (high - low), 0, 1)
    anatomy = arr != -2000
    assert np.all(out.pixels[~anatomy] == 0.0)
    assert np.abs(out.pixels - reference)[anatomy].mean() < 0.01
    assert abs(np.median(out.pixels[anatomy]) - np.median(reference[anatomy])) < 0.01


def test_bits_above_bits_stored_are_masked(tmp_path: Path, picture) -> None:
    path = write_radiograph(tmp_path / "f", picture, RadiographSpec(bits_stored=12))
    clean = _tensor(path)
    ds = pydicom.dcmread(path)
    arr = np.frombuffer(ds.PixelData, np.uint16) | np.uint16(0xF000)  # garbage overlay bits
    ds.PixelData = arr.tobytes()
    ds.save_as(path)
    assert np.array_equal(_tensor(path), clean)


def test_modality_lut_sequence() -> None:
    record = ImageRecord(path="m", abs_path=str(real_file("mlut_18.dcm")))
    options = StageOptions(all_modalities=True)
    read_header(record, options)
    assert decode_record(record, options) is not None, record.reason


def test_unsupported_syntax_is_named(tmp_path: Path, picture) -> None:
    path = write_radiograph(tmp_path / "f", picture, RadiographSpec())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.92"  # JPEG 2000 Part 2 multi-component
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(path)
    record = ImageRecord(path="f", abs_path=str(path))
    read_header(record, StageOptions())
    assert decode_record(record, StageOptions()) is None
    assert record.reason == "unsupported_transfer_syntax:1.2.840.10008.1.2.4.92"


def test_truncated_pixel_data(pydicom_test_files: Path) -> None:
    record = ImageRecord(path="t", abs_path=str(pydicom_test_files / "MR_truncated.dcm"))
    options = StageOptions(all_modalities=True)
    read_header(record, options)
    assert decode_record(record, options) is None
    assert (record.status, record.reason) == ("failed", "truncated_pixel_data")
