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


def _logits(model: object, x: np.ndarray) -> np.ndarray:
    from batchscan.site.training import logits_of

    return logits_of(model, x)


def test_an_ensemble_in_one_chain_gives_exactly_the_mean_of_its_members_logits() -> None:
    """merge_members puts k seed CNNs side by side (grouped conv2, zero weights between
    members): its logit is the members' mean, split_members gives them back, and the maps
    (HiResCAM on the last Conv2D) take it as they take one model."""
    import keras

    from batchscan.results.saliency import Explainer
    from batchscan.scoring.model import (
        build_seed_model,
        members_of,
        merge_members,
        split_members,
    )

    members = []
    for seed in (1, 2, 3):
        keras.utils.set_random_seed(seed)
        members.append(build_seed_model())
    x = np.random.default_rng(0).random((6, 64, 64, 3), dtype=np.float32)
    expected = np.mean([_logits(m, x) for m in members], axis=0)
    merged = merge_members(members)
    assert members_of(merged) == 3 and members_of(members[0]) == 1
    np.testing.assert_allclose(_logits(merged, x), expected, atol=1e-4)
    parts = split_members(merged)
    np.testing.assert_allclose(np.mean([_logits(p, x) for p in parts], axis=0), expected, atol=1e-4)
    for part, member in zip(parts, members, strict=True):  # the features are the member's own
        np.testing.assert_array_equal(
            part.get_layer("conv2").get_weights()[0], member.get_layer("conv2").get_weights()[0]
        )
    heat = Explainer(merged).maps(x[:2])
    assert heat.shape[0] == 2 and np.isfinite(heat).all()
    with pytest.raises(ValueError, match="only single seed CNNs"):
        merge_members([merged])


def test_an_ensemble_is_not_a_base_for_one_model() -> None:
    from batchscan.scoring.model import ModelError, build_seed_model, merge_members
    from batchscan.site.training import Dataset, TrainConfig, train

    x = np.zeros((4, 64, 64, 3), np.float32)
    y = np.array([0, 1, 0, 1])
    splits = ("train", "val", "test")
    data = Dataset({s: x for s in splits}, {s: y for s in splits}, "zeros", None, "test")
    ensemble = merge_members([build_seed_model(), build_seed_model()])
    with pytest.raises(ModelError, match="is an ensemble of 2"):
        train(data, TrainConfig(epochs=1), base=ensemble)
