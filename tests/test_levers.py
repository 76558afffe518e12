"""The levers of a site model that were measured and are not used
(``jobs/common/levers.py``): what the experiments rest on still holds. The ensemble's
adaptation end to end is in tests/test_adapt.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from common import levers


def _logits(model: object, x: np.ndarray) -> np.ndarray:
    from batchscan.site.training import logits_of

    return logits_of(model, x)


def test_an_ensemble_in_one_chain_gives_exactly_the_mean_of_its_members_logits() -> None:
    """merge_members puts k seed CNNs side by side (grouped conv2, zero weights between
    members): its logit is the members' mean, split_members gives them back, and the maps
    (HiResCAM on the last Conv2D) take it as they take one model."""
    import keras

    from batchscan.results.saliency import Explainer
    from batchscan.scoring.model import ModelError, build_seed_model, check_seed_architecture

    members = []
    for seed in (1, 2, 3):
        keras.utils.set_random_seed(seed)
        members.append(build_seed_model())
    x = np.random.default_rng(0).random((6, 64, 64, 3), dtype=np.float32)
    expected = np.mean([_logits(m, x) for m in members], axis=0)
    merged = levers.merge_members(members)
    assert levers.members_of(merged) == 3 and levers.members_of(members[0]) == 1
    np.testing.assert_allclose(_logits(merged, x), expected, atol=1e-4)
    parts = levers.split_members(merged)
    np.testing.assert_allclose(np.mean([_logits(p, x) for p in parts], axis=0), expected, atol=1e-4)
    for part, member in zip(parts, members, strict=True):  # the features are the member's own
        np.testing.assert_array_equal(
            part.get_layer("conv2").get_weights()[0], member.get_layer("conv2").get_weights()[0]
        )
    heat = Explainer(merged).maps(x[:2])
    assert heat.shape[0] == 2 and np.isfinite(heat).all()
    with pytest.raises(ValueError, match="only single seed CNNs"):
        levers.merge_members([merged])
    with pytest.raises(ModelError, match="not the seed architecture"):
        check_seed_architecture(merged)  # the product trains one seed CNN only


def test_erase_borders_paints_edge_bands_and_leaves_the_middle() -> None:
    import tensorflow as tf

    tf.random.set_seed(3)
    x = np.random.default_rng(0).random((16, 64, 64, 3)).astype(np.float32)
    erased = levers.erase_borders(tf.constant(x), 1.0).numpy()
    band = int(np.ceil(levers.BORDER_BAND * 64))
    middle = (slice(None), slice(band, 64 - band), slice(band, 64 - band))
    np.testing.assert_array_equal(erased[middle], x[middle])
    changed = (erased != x).any(axis=-1)
    assert changed.any(axis=(1, 2)).all(), "every picture drawn with probability 1 is erased"
    for picture, mask in zip(erased, changed, strict=True):
        assert len(np.unique(picture[mask])) == 1, "one grey level per picture"
    np.testing.assert_array_equal(levers.erase_borders(tf.constant(x), 0.0).numpy(), x)


def test_a_kept_pretraining_round_trips_under_its_key(tmp_path: Path) -> None:
    from batchscan.site.pretrain import BACKBONE_LAYERS, Pretrained

    rng = np.random.default_rng(0)
    done = Pretrained(
        {name: [rng.random((3, 2)), rng.random(2)] for name in BACKBONE_LAYERS},
        {"images": 2, "views_seen": 600, "collapsed": False},
    )
    period = pd.DataFrame({"path": ["a", "b"], "size": [1, 2], "mtime_ns": [3, 4]})
    key = levers.pretrain_key(period, "base-1", 1, 600)
    assert key != levers.pretrain_key(period.iloc[:1], "base-1", 1, 600)  # other films
    assert key != levers.pretrain_key(period, "base-1", 2, 600)
    assert key != levers.pretrain_key(period, "base-2", 1, 600)
    cache = tmp_path / "pretrained.npz"
    levers.save_pretrained(cache, key, done)
    again = levers.load_pretrained(cache, key)
    assert again is not None and again.facts == done.facts
    for name in BACKBONE_LAYERS:
        for a, b in zip(again.weights[name], done.weights[name], strict=True):
            np.testing.assert_array_equal(a, b)
    assert levers.load_pretrained(cache, "another key") is None
    cache.write_bytes(b"not an npz")
    assert levers.load_pretrained(cache, key) is None


def test_fewer_labelled_studies_are_drawn_by_study_with_the_seed() -> None:
    rows = pd.DataFrame({"study_instance_uid": [f"s{i // 2}" for i in range(20)]})
    drawn = levers.draw_labelled(rows, 4, seed=1)
    assert drawn["study_instance_uid"].nunique() == 4 and len(drawn) == 8  # whole studies
    assert drawn.equals(levers.draw_labelled(rows, 4, seed=1))
    assert not drawn.equals(levers.draw_labelled(rows, 4, seed=2))
    assert levers.draw_labelled(rows, 50, seed=1) is rows
