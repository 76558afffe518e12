"""Reduced-resolution decoding: same scores as full decoding, on real and generated files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

from batchscan.engines.pipeline import model_input
from batchscan.ingest.decoders import DEFAULT_MIN_EDGE, box_reduce, jpeg2000, reduction_level
from batchscan.ingest.dicom import decode_pixels, read_dataset
from batchscan.ingest.header import StageOptions
from batchscan.ingest.sampling import (
    IRREVERSIBLE_9_7,
    REVERSIBLE_5_3,
    Box,
    WaveletBand,
    apply_steps,
)
from batchscan.scoring.model import load_model
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
    """RG1's 1841 rows allow one JPEG 2000 level only (Pillow's rounding); a box average
    does the rest, and the sampling says both."""
    ds = read_dataset(str(real_file("RG1_J2KR.dcm")))
    arr, scale, sampling, _ = decode_pixels(ds, DEFAULT_MIN_EDGE)
    assert scale == 4 and min(arr.shape) >= DEFAULT_MIN_EDGE
    assert sampling.shape == (int(ds.Rows), int(ds.Columns))
    assert sampling.steps == (WaveletBand(REVERSIBLE_5_3, 1), Box(2))
    assert sampling.sampled_shape() == arr.shape


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


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEG2000], ids=lambda s: s.name)
def test_jpeg2000_band_is_what_its_sampling_says(tmp_path: Path, syntax) -> None:
    """OpenJPEG's reduced decode, once Pillow's 16-bit scaling is undone, equals the
    sampling's own model of it (5/3 or 9/7 low-pass, mirrored borders, even samples) applied
    to the full decode, to within the codec's integer rounding (and, lossy, quantization);
    the codec clips the band to the stored range (the low-pass overshoots at sharp edges)."""
    path = write_radiograph(
        tmp_path / "j2k",
        chest_phantom(512, seed=2),
        RadiographSpec(transfer_syntax=syntax, bits_stored=12),
    )
    ds = read_dataset(str(path))
    full = ds.pixel_array.astype(np.float64)
    from batchscan.ingest.decoders import first_frame

    for asked, used in ((1, 1), (2, 2), (3, 3)):  # >= 224 px short edge: one level at least
        band, level, sampling, _ = jpeg2000.decode(first_frame(ds), ds, asked)
        wavelet = REVERSIBLE_5_3 if syntax == JPEG2000Lossless else IRREVERSIBLE_9_7
        assert (level, sampling.steps) == (used, (WaveletBand(wavelet, used),))
        model = apply_steps(sampling.steps, apply_steps(sampling.steps, full).T).T
        model = np.clip(model, 0, 4095)
        assert band.shape == model.shape == sampling.sampled_shape()
        tolerance = 4 if syntax == JPEG2000Lossless else 40  # of 4096 stored values
        assert np.abs(band - model).max() <= tolerance


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
def test_jpeg2000_drops_three_levels_and_scores_agree(tmp_path: Path, model, syntax) -> None:
    """A 2048 px file is decoded as its 256 px band (three levels, 8x the 28 px picture)
    whether its window comes from the header or from the pixels, and scores agree with the
    full decode within 0.005 either way (the picture and the fallback window's sample are
    estimated from the band, see batchscan.ingest.sampling)."""
    picture = chest_phantom(2048, seed=7, opacity=0.6)
    paths = []
    for name, window in (("windowed", (2048.0, 4096.0)), ("percentile", None)):
        spec = RadiographSpec(transfer_syntax=syntax, window=window)
        paths.append(write_radiograph(tmp_path / name, picture, spec))
    decoded = [decode_pixels(read_dataset(str(p)), DEFAULT_MIN_EDGE) for p in paths]
    assert [(d.scale, d.values.shape) for d in decoded] == [(8, (256, 256)), (8, (256, 256))]
    assert all(d.sampling.banded for d in decoded)
    full, reduced = _scores(model, paths, FULL), _scores(model, paths, REDUCED)
    assert np.abs(full - reduced).max() <= 0.005, (full, reduced)
