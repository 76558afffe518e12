"""The shipped model, its card, and refusing models that would score wrongly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from batchscan.ingest.preprocess import PREPROCESSING_SPEC
from batchscan.scoring.model import (
    ModelError,
    default_model_path,
    load_model,
    read_card,
    sha256_of,
)


def test_shipped_card_matches_shipped_file() -> None:
    path = default_model_path()
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["model_sha256"] == sha256_of(path)
    assert card["preprocessing"] == PREPROCESSING_SPEC
    for key in ("test_auc", "test_accuracy", "test_sensitivity", "test_specificity"):
        assert 0.0 <= card[key] <= 1.0
    assert 0.0 < card["threshold"] < 1.0
    assert card["training_data"]["sha256"]
    assert card["architecture"]["parameters"] == 822_337  # 896 + 18,496 + 802,880 + 65


def test_shipped_model_is_the_seed_architecture() -> None:
    loaded = load_model()
    kinds = [type(layer).__name__ for layer in loaded.keras_model.layers]
    assert kinds == [
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Flatten",
        "Dense",
        "Dense",
    ]
    assert loaded.version.startswith("pneumonia_cnn_seed-")


def _copy_model(tmp_path: Path) -> Path:
    source = default_model_path()
    target = tmp_path / source.name
    shutil.copy(source, target)
    shutil.copy(source.with_suffix(".json"), target.with_suffix(".json"))
    return target


def test_refuses_model_without_card(tmp_path: Path) -> None:
    path = _copy_model(tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelError, match="card missing"):
        read_card(path)


def test_refuses_unknown_preprocessing(tmp_path: Path) -> None:
    path = _copy_model(tmp_path)
    card = json.loads(path.with_suffix(".json").read_text())
    card["preprocessing"] = {"name": "batchscan-cxr", "version": 7}
    path.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="version 7"):
        read_card(path)


def test_refuses_file_that_does_not_match_its_card(tmp_path: Path) -> None:
    path = _copy_model(tmp_path)
    with path.open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        read_card(path)


@pytest.mark.shared_data
def test_shipped_model_reproduces_card_test_auc(npz_path: Path) -> None:
    from batchscan.ingest.preprocess import preprocess_many
    from batchscan.site.metrics import roc_auc

    loaded = load_model()
    with np.load(npz_path) as data:
        x = preprocess_many(data["test_images"])
        y = data["test_labels"].reshape(-1)
    scores = loaded.keras_model.predict(x, batch_size=256, verbose=0).reshape(-1)
    assert abs(roc_auc(y, scores) - loaded.card["test_auc"]) <= 0.002


def test_only_the_seed_architecture_is_a_base_for_training() -> None:
    """train sets the base's weights layer by layer: a model of other widths is refused with
    the layer named, not loaded half-way."""
    import keras

    from batchscan.scoring.model import build_seed_model, check_seed_architecture
    from batchscan.site.training import Dataset, TrainConfig, train

    check_seed_architecture(build_seed_model())
    wider = keras.Sequential(
        [
            keras.Input(shape=(64, 64, 3)),
            keras.layers.Conv2D(48, (3, 3), name="conv1"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(1, name="score"),
        ]
    )
    x = np.zeros((4, 64, 64, 3), np.float32)
    y = np.array([0, 1, 0, 1])
    splits = ("train", "val", "test")
    data = Dataset({s: x for s in splits}, {s: y for s in splits}, "zeros", None, "test")
    with pytest.raises(ModelError, match="layer 'conv1'"):
        train(data, TrainConfig(epochs=1), base=wider)
