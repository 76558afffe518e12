"""The image sanity gate: blank and near-constant pictures are not scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batchscan.engines.pipeline import ScanConfig, prepare_record
from batchscan.ingest.header import StageOptions
from batchscan.ingest.preprocess import preprocess
from batchscan.ingest.records import ImageRecord
from batchscan.ingest.sanity import (
    BLANK_RULE,
    MAX_CONSTANT_SPREAD,
    MIN_STRUCTURE,
    blank_detail,
    input_spread,
    input_structure,
    passes,
)
from batchscan.scan import run_scan
from batchscan.scoring.model import check_model
from batchscan.site.training import sanity_bound
from batchscan.synth import RadiographSpec, build_dataset, chest_phantom, write_radiograph
from tests.conftest import load_job, real_file


def _write_stored(path: Path, stored: np.ndarray, window: tuple[float, float] | None) -> Path:
    spec = RadiographSpec(bits_stored=12, window=window)
    build_dataset(stored, spec).save_as(path, enforce_file_format=True)
    return path


def _prepare(path: Path) -> ImageRecord:
    record = ImageRecord(path=path.name, abs_path=str(path))
    prepare_record(record, StageOptions(blank_gate=True))
    return record


def test_the_card_names_the_rule_and_the_gate_does_not_read_a_bound_from_it() -> None:
    card = check_model().card["sanity"]
    assert card["rule"] == BLANK_RULE
    assert card["max_constant_spread"] == MAX_CONSTANT_SPREAD
    assert card["min_structure"] == MIN_STRUCTURE
    assert card["training_min_spread"] > MAX_CONSTANT_SPREAD
    assert card["training_min_structure"] > MIN_STRUCTURE


@pytest.mark.parametrize("window", [None, (2048.0, 4096.0)], ids=["percentile", "header"])
def test_blank_constant_and_noise_only_images_are_skipped(tmp_path: Path, window) -> None:
    rng = np.random.default_rng(0)
    zero = _write_stored(tmp_path / "zero", np.zeros((2048, 2048), np.uint16), window)
    flat = 1000 + rng.integers(-2, 3, size=(512, 512))
    flat_path = _write_stored(tmp_path / "flat", flat.astype(np.uint16), window)
    # detector noise only, at the 28 px picture's own scale (finer noise averages to flat)
    noise = rng.poisson(200, size=(28, 28)).repeat(16, 0).repeat(16, 1) * 8
    noise_path = _write_stored(tmp_path / "noise", noise.astype(np.uint16), window)
    # a flat picture is constant under a header window; a percentile window stretches its
    # +-2 levels into noise, so it is blank as noise only
    cases = (
        (zero, ("constant",)),
        (flat_path, ("constant", "noise only")),
        (noise_path, ("noise only",)),
    )
    for path, why in cases:
        record = _prepare(path)
        assert (record.status, record.reason) == ("skipped", "blank_image"), record.detail
        assert record.detail.startswith(why)
    phantom = write_radiograph(tmp_path / "chest", chest_phantom(512), RadiographSpec())
    assert _prepare(phantom).status == "pending"  # goes on to inference


def test_rule_on_model_inputs() -> None:
    rng = np.random.default_rng(1)
    for size in (28, 64, 256, 1024):
        for noise in (
            rng.uniform(size=(size, size)),
            0.5 + 0.3 * rng.standard_normal((size, size)),
        ):
            tensor = preprocess(np.clip(noise, 0, 1).astype(np.float32))
            assert blank_detail(tensor) is not None
            assert input_structure(tensor) < MIN_STRUCTURE or input_spread(tensor) < 0.01
    assert blank_detail(np.zeros((64, 64, 3), np.float32)) is not None
    assert input_structure(np.zeros((64, 64, 3), np.float32)) == 0.0
    assert blank_detail(preprocess(chest_phantom(256))) is None
    assert passes(ImageRecord(path="a", abs_path="a"), preprocess(chest_phantom(256)))


def test_a_trained_model_gets_the_same_rule() -> None:
    inputs = np.stack([preprocess(chest_phantom(128, seed=s)) for s in range(4)])
    entry = sanity_bound(inputs)
    assert entry["rule"] == BLANK_RULE
    assert entry["training_min_spread"] == pytest.approx(min(input_spread(x) for x in inputs))


def test_real_films_of_pydicom_data_are_not_blank(pydicom_data_files: Path) -> None:
    from batchscan.ingest.header import read_header

    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        record = ImageRecord(path=name, abs_path=str(real_file(name)))
        options = StageOptions(blank_gate=True)
        read_header(record, options)
        tensor = prepare_record(record, options)
        assert tensor is not None and blank_detail(tensor) is None, record.detail


@pytest.mark.slow
@pytest.mark.shared_data
def test_no_film_of_any_data_set_is_blank(npz_path: Path) -> None:
    """The measurement the bounds rest on (jobs/experiments/blank_bound.py): every picture we
    have."""
    job = load_job("experiments/blank_bound")
    for name, inputs in job.real_sets(npz_path.parent):
        blank = [i for i, x in enumerate(inputs) if blank_detail(x) is not None]
        assert blank == [], f"{name}: {len(blank)} real films called blank"


@pytest.mark.slow
def test_scan_skips_a_blank_chest_cr(tmp_path: Path) -> None:
    archive, out = tmp_path / "archive", tmp_path / "out"
    archive.mkdir()
    _write_stored(archive / "blank", np.zeros((1024, 1024), np.uint16), None)
    write_radiograph(archive / "chest", chest_phantom(512), RadiographSpec(accession="A2"))
    run_scan(ScanConfig(archive=archive, out=out, workers=1, jit_compile=False))
    images = pd.read_parquet(out / "images.parquet").set_index("path")
    assert images.loc["blank", ["status", "reason"]].tolist() == ["skipped", "blank_image"]
    assert images.loc["chest", "status"] == "scored"
