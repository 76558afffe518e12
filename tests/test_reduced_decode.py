"""Reduced-resolution decoding: same scores as full decoding, on real and generated files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

from batchscan.decoders import DEFAULT_MIN_EDGE, box_reduce, jpeg2000, reduction_level
from batchscan.dicom import decode_pixels, read_dataset
from batchscan.header import StageOptions
from batchscan.model import load_model
from batchscan.pipeline import model_input
from batchscan.synth import RadiographSpec, chest_phantom, write_radiograph
from tests.conftest import real_file

FULL = StageOptions(min_edge=None)
REDUCED = StageOptions()


@pytest.fixture(scope="module")
def model():
    return load_model().keras_model


def _scores(model, paths: list[Path], options: StageOptions) -> np.ndarray:
    inputs = np.stack([model_input(p, options) for p in paths])
    return model.predict(inputs, verbose=0).reshape(-1)


def test_rg1_scores_agree_with_full_decoding(model) -> None:
    paths = [real_file(n) for n in ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")]
    full, reduced = _scores(model, paths, FULL), _scores(model, paths, REDUCED)
    assert np.abs(full - reduced).max() <= 0.005, (full, reduced)


def test_rg1_is_decoded_small(tmp_path: Path) -> None:
    ds = read_dataset(str(real_file("RG1_J2KR.dcm")))
    arr, scale, offset, _ = decode_pixels(ds, DEFAULT_MIN_EDGE)
    assert scale == 4 and min(arr.shape) >= DEFAULT_MIN_EDGE
    assert offset == pytest.approx(0.25 / 2)  # one JPEG 2000 level (offset 0.25), then box x2


@pytest.mark.parametrize(
    "syntax", [JPEG2000Lossless, JPEG2000, JPEGBaseline8Bit, RLELossless], ids=lambda s: s.name
)
def test_generated_radiographs_agree(tmp_path: Path, model, syntax) -> None:
    paths = []
    for i in range(3):
        picture = chest_phantom(1024, seed=40 + i, opacity=0.5 * i)
        spec = RadiographSpec(transfer_syntax=syntax, window=(2048, 4096) if i else None)
        paths.append(write_radiograph(tmp_path / f"im{i}", picture, spec))
    full, reduced = _scores(model, paths, FULL), _scores(model, paths, REDUCED)
    assert np.abs(full - reduced).max() <= 0.01, (full, reduced)


def test_jpeg2000_levels_match_box_averages(tmp_path: Path) -> None:
    """Pillow's reduced decode, once its 16-bit scaling is undone, is a low-pass of the
    same picture: close to the box average of the full decode, never off in scale."""
    path = write_radiograph(
        tmp_path / "j2k",
        chest_phantom(512, seed=2),
        RadiographSpec(transfer_syntax=JPEG2000Lossless, bits_stored=12),
    )
    ds = read_dataset(str(path))
    full = ds.pixel_array
    from batchscan.decoders import first_frame

    for level, windowed in ((1, False), (2, False), (2, True)):
        reduced, used, offset, _ = jpeg2000.decode(first_frame(ds), ds, level, windowed=windowed)
        # with a header window as far as asked (and >= OVERSAMPLED_EDGE), else one level
        assert used == (2 if windowed else min(level, jpeg2000.MAX_LEVEL_PERCENTILE))
        assert offset == jpeg2000.grid_offset(used)
        box = box_reduce(full, 2**used).astype(np.int64)
        assert abs(reduced.astype(np.int64).mean() - box.mean()) < 0.01 * box.mean()


def test_box_compensation_matches_a_box_average() -> None:
    """The fitted [a, 1 - 2a, a] brings the wavelet's level-3 response closer to a box
    average of 8 pixels over the band a 28 px picture keeps; a sharpens (9/7) or blurs
    (5/3) as the filters say, and does nothing at level 0."""
    for transform in (0, 1):
        a = jpeg2000.box_compensation(transform, 3, 256)
        band = np.linspace(1e-6, 2 * np.pi * 28 / 256, 64)
        omega = band / 8
        taps = jpeg2000._LOW_PASS[transform]
        wavelet = np.prod([jpeg2000._response(taps, 2**j * omega) for j in range(3)], axis=0)
        box = np.sin(8 * omega / 2) / (8 * np.sin(omega / 2))
        fixed = wavelet * (1 + a * (2 * np.cos(band) - 2))
        assert np.abs(fixed - box).max() < np.abs(wavelet - box).max()
    assert jpeg2000.box_compensation(1, 3, 256) > 0 > jpeg2000.box_compensation(0, 3, 256)
    assert jpeg2000.box_compensation(1, 0, 256) == 0.0
    flat = np.full((8, 8), 1000, dtype=np.uint16)
    np.testing.assert_array_equal(jpeg2000.compensate(flat, 0.12), flat)


def test_pillow_rounding_limits_levels() -> None:
    assert jpeg2000._pillow_agrees(2048, 3)
    assert not jpeg2000._pillow_agrees(1841, 2)  # ceil 461, Pillow 460: would fail to decode


def test_reduction_level_and_box_reduce() -> None:
    assert reduction_level(2048, 2048, 224) == 3
    assert reduction_level(1955, 1841, 224) == 3
    assert reduction_level(200, 2000, 224) == 0
    arr = np.arange(16, dtype=np.uint16).reshape(4, 4)
    assert box_reduce(arr, 2).tolist() == [[3, 5], [11, 13]]  # rounded block means
    signed = np.array([[-3, -1], [1, 3]], dtype=np.int16)
    assert box_reduce(signed, 2).tolist() == [[0]]


def test_scan_decodes_reduced_unless_full_resolution(tmp_path: Path) -> None:
    """The command line's --full-resolution reaches the workers; both paths score alike."""
    import shutil

    import pandas as pd

    from batchscan.cli import main

    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("RG1_UNCR.dcm", "RG1_J2KI.dcm"):
        shutil.copy(real_file(name), archive / name)
    frames = {}
    for label, extra in (("reduced", []), ("full", ["--full-resolution"])):
        out = tmp_path / label
        argv = ["scan", str(archive), "--out", str(out), "--workers", "1", "--no-progress"]
        assert main(argv + extra) == 0
        frames[label] = pd.read_parquet(out / "images.parquet").sort_values("path")
    assert (frames["full"]["decode_scale"] == 1).all()
    assert (frames["reduced"]["decode_scale"] > 1).all()
    assert (frames["full"]["status"] == "scored").all()
    delta = frames["full"]["score"].to_numpy() - frames["reduced"]["score"].to_numpy()
    assert np.abs(delta).max() <= 0.005


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEG2000], ids=lambda s: s.name)
def test_jpeg2000_drops_two_levels_only_with_a_header_window(tmp_path: Path, model, syntax) -> None:
    """A 2048 px file reaches the 512 px decode size through two codestream levels (low-pass
    compensated) when its window comes from the header; through one level and a box
    average when the window would be computed from the pixels (see
    batchscan.decoders.jpeg2000). Scores agree with the full decode within 0.005 either way."""
    picture = chest_phantom(2048, seed=7, opacity=0.6)
    paths = []
    for name, window in (("windowed", (2048.0, 4096.0)), ("percentile", None)):
        spec = RadiographSpec(transfer_syntax=syntax, window=window)
        paths.append(write_radiograph(tmp_path / name, picture, spec))
    decoded = [decode_pixels(read_dataset(str(p)), DEFAULT_MIN_EDGE) for p in paths]
    assert [(d.scale, d.values.shape) for d in decoded] == [(4, (512, 512)), (4, (512, 512))]
    assert [d.offset for d in decoded] == [jpeg2000.grid_offset(2), jpeg2000.grid_offset(1) / 2]
    full, reduced = _scores(model, paths, FULL), _scores(model, paths, REDUCED)
    assert np.abs(full - reduced).max() <= 0.005, (full, reduced)
