"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from batchscan.site.metrics import (
    expected_calibration_error,
    fit_platt,
    roc_auc,
    split_metrics,
    youden_threshold,
)


def test_auc_exact_with_ties() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    with pytest.raises(ValueError):
        roc_auc(np.array([1, 1]), np.array([0.1, 0.2]))


def test_youden_and_split_metrics() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.6, 0.5, 0.7, 0.9])
    t = youden_threshold(y, s)
    assert t == 0.5
    m = split_metrics(y, s, t)
    assert m.sensitivity == 1.0 and m.specificity == pytest.approx(2 / 3)
    assert m.accuracy == pytest.approx(5 / 6)
    assert m.auc_ci95[0] <= m.auc <= m.auc_ci95[1]


def test_platt_recovers_overconfidence_and_shift() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-true_logits))
    # a model 3x overconfident and shifted by +1.5 (as class weighting shifts scores)
    scale, shift = fit_platt(y, 3.0 * true_logits + 1.5)
    assert scale == pytest.approx(1 / 3, rel=0.05)
    assert shift == pytest.approx(-0.5, abs=0.08)


def test_ece_of_perfect_calibration_is_small() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(50000)
    y = rng.random(50000) < p
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, np.clip(p + 0.2, 0, 1)) > 0.1


def test_attribute_auc_says_how_much_a_header_value_predicts() -> None:
    from batchscan.site.metrics import attribute_auc

    y = np.array([1, 1, 1, 0, 0, 0])
    assert attribute_auc(y, ["AP", "AP", "AP", "PA", "PA", "PA"]) == 1.0
    assert attribute_auc(y, ["AP"] * 6) == 0.5  # one value says nothing
    assert attribute_auc(y, ["AP", "PA", "AP", "PA", "AP", "PA"]) == pytest.approx(
        roc_auc(y, np.array([2, 1, 2, 1, 2, 1]) / 3)
    )
    assert attribute_auc(np.ones(3), ["a", "b", "c"]) is None


def test_within_stratum_auc_pools_pairs_of_the_same_stratum() -> None:
    from batchscan.site.metrics import within_stratum_auc

    # a "model" that scores the view: perfect overall, chance within each view
    view = np.array(["AP"] * 4 + ["PA"] * 4)
    y = np.array([1, 1, 1, 0, 1, 0, 0, 0])
    by_view = (view == "AP").astype(float)
    assert roc_auc(y, by_view) == 0.75
    auc, pairs = within_stratum_auc(y, by_view, view)
    assert (auc, pairs) == (0.5, 3 * 1 + 1 * 3)
    # a model right within each view: 1.0 whatever the views' mixes
    good = y + 0.1 * (view == "AP")
    assert within_stratum_auc(y, good, view) == (1.0, 6)
    assert within_stratum_auc(np.array([1, 0]), np.array([0.9, 0.1]), ["a", "b"]) == (None, 0)
