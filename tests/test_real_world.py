"""Real-world DICOM that other toolkits read: one regression file per case, made here.

Each test builds the kind of file met in other projects' test data (NEMA WG04, LEADTOOLS,
old Samba shares...) with pydicom, imagecodecs and byte patching, and checks what batchscan
records for it. Every one of them failed before the change that added it.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import imagecodecs
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
)

from batchscan.engines.pipeline import ScanConfig, prepare_record
from batchscan.ingest.dicom import read_display_image
from batchscan.ingest.discover import iter_files
from batchscan.ingest.header import StageOptions
from batchscan.ingest.records import ImageRecord
from batchscan.scan import run_scan
from batchscan.synth import RadiographSpec, build_dataset, chest_phantom, stored_values

SPEC = RadiographSpec(bits_stored=12)
PIXELS = stored_values(chest_phantom(128, seed=3), SPEC)


def _bytes(ds: Dataset, *, implicit: bool = False) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    return buffer.getvalue()


def _meta_end(data: bytes) -> int:
    return 144 + struct.unpack("<I", data[140:144])[0]


def _prepare(path: Path) -> ImageRecord:
    info = path.stat()
    record = ImageRecord(
        path=path.name, abs_path=str(path), size=info.st_size, mtime_ns=info.st_mtime_ns
    )
    if prepare_record(record, StageOptions()) is not None:
        record.status = "scored"
    return record


def _jpeg(ds: Dataset, frame: bytes, syntax: str) -> Dataset:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


# -- case 1: file names that are not UTF-8 ---------------------------------------------------


@pytest.mark.slow
def test_non_utf8_names_are_scored_and_reported_losslessly(tmp_path: Path) -> None:
    archive, out = tmp_path / "archive", tmp_path / "out"
    archive.mkdir()
    names = [b"caf\xe9.dcm", b"\xff\xfe.dcm", b"plain.dcm"]
    for i, name in enumerate(names):
        spec = RadiographSpec(bits_stored=12, accession=f"A{i}")
        ds = build_dataset(stored_values(chest_phantom(128, seed=i), spec), spec)
        with open(os.fsencode(archive) + b"/" + name, "wb") as handle:
            handle.write(_bytes(ds))
    config = ScanConfig(archive=archive, out=out, workers=1, jit_compile=False)
    for _ in range(2):  # the second run reuses every row from the state
        result = run_scan(config)
    assert result.manifest["files_reused"] == 3
    images = pd.read_parquet(out / "images.parquet").set_index("path")
    assert set(images.index) == {"caf\\xe9.dcm", "\\xff\\xfe.dcm", "plain.dcm"}
    assert (images["status"] == "scored").all()
    assert images.loc["caf\\xe9.dcm", "path_bytes"] == b"caf\xe9.dcm"
    assert images.loc["\\xff\\xfe.dcm", "path_bytes"] == b"\xff\xfe.dcm"
    assert images.loc["plain.dcm", "path_bytes"] is None


# -- case 2: 12-bit JPEG extended whose scan header says Se=0 --------------------------------


def _jply(path: Path) -> Path:
    frame = bytearray(imagecodecs.jpeg8_encode(PIXELS, level=95, bitspersample=12))
    sos = frame.find(b"\xff\xda")
    components = frame[sos + 4]
    se = sos + 4 + 1 + 2 * components + 1
    assert frame[se] == 63
    frame[se] = 0  # as in the NEMA WG04 *_JPLY files
    ds = _jpeg(build_dataset(PIXELS, SPEC), bytes(frame), JPEGExtended12Bit)
    path.write_bytes(_bytes(ds))
    return path


def test_jpeg_extended_with_se_zero_is_read_by_libjpeg_turbo(tmp_path: Path) -> None:
    path = _jply(tmp_path / "jply.dcm")
    with pytest.raises(Exception, match="scan stop must be 63"):
        pydicom.dcmread(path).pixel_array  # noqa: B018 (pylibjpeg refuses it)
    image = read_display_image(str(path), min_edge=None)
    assert image.decoder == "libjpeg-turbo"
    expected = read_display_image(str(_lossless(tmp_path / "ref.dcm")), min_edge=None)
    assert np.abs(image.pixels - expected.pixels).mean() < 0.01
    assert _prepare(path).status == "scored"


def _lossless(path: Path, pixels: np.ndarray = PIXELS, bits: int = 12) -> Path:
    frame = imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1, bitspersample=bits)
    path.write_bytes(_bytes(_jpeg(build_dataset(pixels, SPEC), frame, JPEGLosslessSV1)))
    return path


@pytest.mark.parametrize(("precision", "stored"), [(12, 12), (16, 16), (16, 12)])
def test_lossless_jpeg_by_libjpeg_turbo_equals_pydicom(
    tmp_path: Path, precision: int, stored: int
) -> None:
    from batchscan.ingest.decoders import first_frame, pydicom_plugins, turbo

    pixels = (PIXELS.astype(np.uint32) << (precision - 12)).astype(np.uint16)
    frame = imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1, bitspersample=precision)
    ds = build_dataset(pixels, RadiographSpec(bits_stored=stored))
    path = tmp_path / "sv1.dcm"
    path.write_bytes(_bytes(_jpeg(ds, frame, JPEGLosslessSV1)))
    ds = pydicom.dcmread(path)
    fast = turbo.decode(first_frame(ds), ds, 0)
    reference = pydicom_plugins.decode(None, ds, 0)
    assert fast is not None and reference is not None
    np.testing.assert_array_equal(fast.values, reference.values)
    np.testing.assert_array_equal(fast.values, pixels & ((1 << stored) - 1))


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"])
def test_lossless_jpeg_real_files_equal_pydicom(name: str) -> None:
    """pydicom's own JPEG lossless files (16-bit signed process 14, 8-bit SV1)."""
    from batchscan.ingest.decoders import decode_frame, first_frame, pydicom_plugins, turbo
    from tests.conftest import real_file

    ds = pydicom.dcmread(real_file(name))
    fast = turbo.decode(first_frame(ds), ds, 0)
    reference = pydicom_plugins.decode(None, ds, 0)
    assert fast is not None and reference is not None
    assert fast.values.dtype == reference.values.dtype
    np.testing.assert_array_equal(fast.values, reference.values)
    assert decode_frame(ds, None).decoder == "libjpeg-turbo"


def test_jpeg_that_every_pydicom_plugin_refuses_is_read() -> None:
    from tests.conftest import real_file

    image = read_display_image(str(real_file("JPEG-lossy.dcm")), min_edge=None)
    assert image.decoder == "libjpeg-turbo" and image.pixels.std() > 0.05


# -- case 3: a Modality LUT Sequence with an empty item ---------------------------------------


@pytest.mark.parametrize(("rescale", "source"), [(True, "rescale"), (False, "identity")])
def test_empty_modality_lut_item_falls_back(tmp_path: Path, rescale: bool, source: str) -> None:
    ds = build_dataset(PIXELS, SPEC)
    ds.ModalityLUTSequence = Sequence([Dataset()])  # as LEADTOOLS writes it
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    path = tmp_path / "mlut.dcm"
    path.write_bytes(_bytes(ds))
    image = read_display_image(str(path), min_edge=None)
    assert image.modality_source == f"{source}:lut_invalid"
    plain = tmp_path / "plain.dcm"
    plain.write_bytes(_bytes(build_dataset(PIXELS, SPEC)))
    # the percentile window follows the (linear) rescale: the same picture
    np.testing.assert_allclose(
        image.pixels, read_display_image(str(plain), min_edge=None).pixels, atol=1e-6
    )
    record = _prepare(path)
    assert (record.status, record.modality_source) == ("scored", f"{source}:lut_invalid")


# -- case 4: a VOI LUT Sequence whose LUT Data has VR OW --------------------------------------


def test_voi_lut_with_ow_data_is_applied(tmp_path: Path) -> None:
    lut = np.sqrt(np.arange(4096) / 4095.0) * 65535
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())
    ds = build_dataset(PIXELS, SPEC)
    ds.VOILUTSequence = Sequence([item])
    ds.WindowCenter, ds.WindowWidth = 2048, 4096  # a valid window too: the LUT comes first
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "voi_ow.dcm"
    path.write_bytes(_bytes(ds, implicit=True))
    assert pydicom.dcmread(path).VOILUTSequence[0]["LUTData"].VR == "OW"
    image = read_display_image(str(path), min_edge=None)
    assert image.voi_source == "voi_lut"
    expected = np.sqrt(PIXELS / 4095.0)
    assert np.abs(image.pixels - expected).max() < 1e-3


# -- case 5: a stray group 0002 element after the file meta ----------------------------------


def test_file_meta_group_length_is_authoritative(tmp_path: Path) -> None:
    data = _lossless(tmp_path / "sv1.dcm").read_bytes()
    end = _meta_end(data)
    value = ExplicitVRLittleEndian.encode() + b"\0"
    stray = b"\x02\x00\x10\x00UI" + struct.pack("<H", len(value)) + value
    path = tmp_path / "stray.dcm"
    path.write_bytes(data[:end] + stray + data[end:])
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    record = _prepare(path)
    assert (record.status, record.reason, record.decoder) == ("scored", None, "libjpeg-turbo")
    assert record.transfer_syntax_uid == JPEGLosslessSV1


# -- case 6: a parse failure pydicom raises as OSError ----------------------------------------


def test_pydicom_oserror_is_a_permanent_failure(tmp_path: Path) -> None:
    ds = build_dataset(PIXELS, SPEC)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    data = _bytes(ds, implicit=True)
    # implicit VR: a private element of undefined length whose item never ends
    undefined = struct.pack("<I", 0xFFFFFFFF)
    element = b"\x09\x00\x10\x10" + undefined + b"\xfe\xff\x00\xe0" + undefined + b"\x09\x00"
    path = tmp_path / "un.dcm"
    path.write_bytes(data[: _meta_end(data)] + element)
    with pytest.raises(OSError) as raised:
        pydicom.dcmread(path)
    assert raised.value.errno is None  # no I/O error: pydicom could not parse it
    record = _prepare(path)
    assert (record.status, record.reason) == ("failed", "header_error:OSError")


# -- case 7: a path longer than PATH_MAX ------------------------------------------------------


def test_path_longer_than_path_max_gets_its_own_row(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    depth = 0
    try:
        for depth in range(20):  # 20 x 250 bytes: past PATH_MAX without ever naming it
            name = f"d{depth:02d}" + "x" * 247
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        handle = os.open("deep.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(handle, _bytes(build_dataset(PIXELS, SPEC)))
        os.close(handle)
    finally:
        os.close(fd)
    records = [r for r in iter_files(tmp_path) if r.path.endswith("deep.dcm")]
    assert len(records) == 1 and len(records[0].abs_path) > 4096
    prepare_record(records[0], StageOptions())
    assert records[0].status == "pending" and records[0].reason is None  # decoded fine
    assert depth == 19


# -- cases 8 and 9: DICM with nothing, garbage or zeros after it ------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\0" * 128 + b"DICM", "truncated_header"),
        (b"\0" * 128 + b"DICM" + b"GARBAGE!" * 64, "bad_header:no_data_set"),
        (b"\0" * 128 + b"DICM" + b"\0" * 4096, "bad_header:no_data_set"),
    ],
)
def test_dicm_without_a_data_set_fails(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "cut"
    path.write_bytes(content)
    record = _prepare(path)
    assert (record.status, record.reason) == ("failed", reason)


def test_file_meta_alone_is_truncated(tmp_path: Path) -> None:
    data = _bytes(build_dataset(PIXELS, SPEC))
    path = tmp_path / "meta_only"
    path.write_bytes(data[: _meta_end(data)])
    assert _prepare(path).reason == "truncated_header"


def test_sparse_zeros_after_dicm_fail_fast(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        handle.truncate(2 * 1024**3)  # 2 GiB, sparse: costs no disk
    record = _prepare(path)
    assert (record.status, record.reason) == ("failed", "bad_header:no_data_set")


def test_zeros_after_a_valid_file_meta_fail_fast(tmp_path: Path) -> None:
    data = _bytes(build_dataset(PIXELS, SPEC))
    path = tmp_path / "zeros"
    with open(path, "wb") as handle:
        handle.write(data[: _meta_end(data)])
        handle.truncate(2 * 1024**3)
    assert _prepare(path).reason == "bad_header:no_data_set"
