"""The image sanity gate: blank and near-constant pictures are not scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batchscan.header import StageOptions
from batchscan.model import check_model
from batchscan.pipeline import ScanConfig, prepare_record
from batchscan.records import ImageRecord
from batchscan.sanity import input_spread, passes
from batchscan.scan import run_scan
from batchscan.synth import RadiographSpec, build_dataset, chest_phantom, write_radiograph
from batchscan.training import sanity_bound

BOUND = check_model().min_input_std


def _write_stored(path: Path, stored: np.ndarray, window: tuple[float, float] | None) -> Path:
    spec = RadiographSpec(bits_stored=12, window=window)
    build_dataset(stored, spec).save_as(path, enforce_file_format=True)
    return path


def _prepare(path: Path) -> ImageRecord:
    record = ImageRecord(path=path.name, abs_path=str(path))
    prepare_record(record, StageOptions(min_input_std=BOUND))
    return record


def test_the_shipped_card_has_a_bound_from_its_training_data() -> None:
    assert BOUND is not None and 0.01 < BOUND < 0.05
    card = check_model().card["sanity"]
    assert "train split" in card["computed_on"]


@pytest.mark.parametrize("window", [None, (2048.0, 4096.0)], ids=["percentile", "header"])
def test_blank_and_near_constant_images_are_skipped(tmp_path: Path, window) -> None:
    blank = _write_stored(tmp_path / "blank", np.zeros((2048, 2048), np.uint16), window)
    rng = np.random.default_rng(0)
    flat = 1000 + rng.integers(-2, 3, size=(512, 512))
    flat_path = _write_stored(tmp_path / "flat", flat.astype(np.uint16), window)
    for path in (blank, flat_path):
        record = _prepare(path)
        assert (record.status, record.reason) == ("skipped", "blank_image"), record.detail
    phantom = write_radiograph(tmp_path / "chest", chest_phantom(512), RadiographSpec())
    assert _prepare(phantom).status == "pending"  # goes on to inference


def test_bound_is_the_flattest_training_input() -> None:
    inputs = np.stack([np.full((64, 64, 3), 0.5, np.float32) for _ in range(3)])
    inputs[0, :32] += 0.1  # spreads 0.05, 0.0, 0.0 -> the flattest is 0
    inputs[1, :, :32] -= 0.2
    inputs[2] = inputs[1]
    bound = sanity_bound(inputs)
    assert bound["min_input_std"] == pytest.approx(min(input_spread(x) for x in inputs))
    assert passes(ImageRecord(path="a", abs_path="a"), inputs[0], None)


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
