"""The training job end to end on small generated data (seconds, not minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchscan.scoring.model import load_model
from batchscan.synth import RadiographSpec, chest_phantom, write_radiograph
from tests.conftest import load_job

train_job = load_job("train")


def _pictures(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % 2
    images = np.stack(
        [
            np.rint(chest_phantom(56, seed=seed + i, opacity=0.9 * label) * 255).astype(np.uint8)[
                ::2, ::2
            ]
            for i, label in enumerate(labels)
        ]
    )
    return images, labels.reshape(-1, 1).astype(np.uint8)


def test_train_job_on_npz_writes_model_and_card(tmp_path: Path) -> None:
    arrays = {}
    for split, n in (("train", 64), ("val", 24), ("test", 24)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = _pictures(n, seed=len(arrays) * 100)
    data = tmp_path / "tiny.npz"
    np.savez(data, **arrays)
    out = tmp_path / "m" / "tiny.keras"
    assert (
        train_job.main(["--data", str(data), "--out", str(out), "--epochs", "2", "--patience", "1"])
        == 0
    )
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["training_data"]["name"] == "tiny.npz"
    assert card["training"]["epochs_run"] <= 2
    assert set(card["metrics"]) >= {"val_auc", "test_auc", "test_auc_ci95", "test_ece"}
    loaded = load_model(out)  # the card is complete enough for inference
    assert 0.0 <= loaded.threshold <= 1.0


def test_train_job_on_folder_of_dicom_and_png(tmp_path: Path) -> None:
    for label, opacity in (("NORMAL", 0.0), ("PNEUMONIA", 0.9)):
        for i in range(8):
            picture = chest_phantom(96, seed=i + (50 if opacity else 0), opacity=opacity)
            if i % 2:
                write_radiograph(
                    tmp_path / "data" / label / f"im{i}.dcm", picture, RadiographSpec()
                )
            else:
                target = tmp_path / "data" / label / f"im{i}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.rint(picture * 255).astype(np.uint8)).save(target)
    out = tmp_path / "folder.keras"
    assert (
        train_job.main(["--folder", str(tmp_path / "data"), "--out", str(out), "--epochs", "1"])
        == 0
    )
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["training_data"]["splits"]["train"]["n"] == 12


def test_missing_data_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        train_job.main(["--data", str(tmp_path / "nope.npz")])
    assert exc.value.code == 2


def test_simsiam_pretraining_moves_the_backbone(tmp_path: Path) -> None:
    from batchscan.ingest.preprocess import preprocess_many
    from batchscan.site.pretrain import BACKBONE_LAYERS, pretrain, with_backbone

    base = load_model().keras_model
    pictures = [chest_phantom(64, seed=i, opacity=0.6 * (i % 2)) for i in range(300)]
    done = pretrain(base, preprocess_many(pictures), views=600, seed=1)
    assert done.facts["views_seen"] >= 600 and not done.facts["collapsed"]
    assert done.weights is not None and set(done.weights) == set(BACKBONE_LAYERS)
    moved = with_backbone(base, done)
    assert not np.allclose(
        moved.get_layer("conv1").get_weights()[0], base.get_layer("conv1").get_weights()[0]
    )
    np.testing.assert_array_equal(  # the output layer is the base's
        moved.get_layer("score").get_weights()[0], base.get_layer("score").get_weights()[0]
    )
