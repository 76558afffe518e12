"""The out-of-distribution score: fitted statistics, the card entry and the scan's columns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batchscan.engines.pipeline import ScanConfig
from batchscan.scan import run_scan
from batchscan.scoring import ood
from batchscan.scoring.model import ModelError, check_model, default_model_path
from batchscan.synth import RadiographSpec, chest_phantom, write_radiograph


def test_distances_grow_away_from_the_training_classes() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 500)
    features = rng.normal(size=(1000, 8)) + labels[:, None] * 3.0
    features[:, 7] = 0.0  # a unit that never fires: the ridge keeps the covariance invertible
    stats = ood.fit(features, labels)
    own = ood.distances(features, stats)
    assert np.isclose((own > stats.threshold).mean(), 0.01, atol=0.002)
    near = ood.distances(np.zeros((1, 8)), stats)[0]
    far = ood.distances(np.full((1, 8), 12.0), stats)[0]
    assert near < stats.threshold < far


def test_statistics_round_trip_and_are_checked(tmp_path: Path) -> None:
    stats = ood.fit(np.random.default_rng(1).normal(size=(200, 4)), np.zeros(200))
    path = tmp_path / "m.ood.npz"
    section = ood.card_section(stats, path, ood.save(stats, path), 200)
    loaded = ood.load(tmp_path / "m.keras", {"ood": section})
    assert loaded is not None and loaded.threshold == stats.threshold
    np.testing.assert_array_equal(loaded.precision, stats.precision)
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(ValueError, match="sha256"):
        ood.load(tmp_path / "m.keras", {"ood": section})
    assert ood.load(tmp_path / "m.keras", {}) is None


def test_shipped_card_names_its_statistics(tmp_path: Path) -> None:
    checked = check_model()
    assert checked.ood is not None and checked.card["ood"]["layer"] == "dense"
    # a model copied without its statistics file is refused before any file is read
    model = tmp_path / "copy.keras"
    shutil.copy(default_model_path(), model)
    card = json.loads(default_model_path().with_suffix(".json").read_text())
    (tmp_path / "copy.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="OOD statistics"):
        check_model(model)


@pytest.mark.slow
def test_scan_writes_ood_score_per_scored_image(tmp_path: Path) -> None:
    archive, out = tmp_path / "archive", tmp_path / "out"
    picture = chest_phantom(256, seed=3)
    write_radiograph(archive / "chest", picture, RadiographSpec(view="AP"))
    write_radiograph(archive / "lateral", picture, RadiographSpec(view="LL"))
    run_scan(ScanConfig(archive=archive, out=out, workers=0, jit_compile=False))
    images = pd.read_parquet(out / "images.parquet").set_index("path")
    chest = images.loc["chest"]
    assert chest["ood_score"] > 0 and isinstance(chest["ood"], bool | np.bool_)
    assert chest["ood"] == (chest["ood_score"] > check_model().card["ood"]["threshold"])
    assert pd.isna(images.loc["lateral", "ood_score"])  # not scored, no OOD score
