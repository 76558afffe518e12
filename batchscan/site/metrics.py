"""Held-out metrics and calibration for a binary scorer, in plain numpy.

Training, the evaluation job and the tests all report the same numbers, so they are computed
here once. The AUC is the exact rank statistic (Mann-Whitney U with ties averaged), not the
binned approximation of ``keras.metrics.AUC``, because the card quotes it to three decimals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Final

import numpy as np

#: Bins of the expected calibration error (equal width on [0, 1]).
ECE_BINS: Final = 15
#: The standard normal distribution (tails and quantiles of the share tests).
NORMAL: Final = NormalDist()


def _as_arrays(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    return y, s


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact area under the ROC curve.

    Raises
    ------
    ValueError
        If only one class is present (the AUC is undefined).
    """
    y, s = _as_arrays(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both classes")
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def attribute_auc(labels: np.ndarray, values: np.ndarray | list[object]) -> float | None:
    """How well a header attribute alone separates the labels: the AUC of the score "share of
    positives among the studies with this value" (the best ranking the attribute allows on
    these studies, so in-sample; 0.5 when it says nothing). None with one class only.

    A view, a device or a ward that predicts the labels lets a model score well without
    looking at the lungs (a shortcut); this says how much there is to take.
    """
    y = np.asarray(labels).reshape(-1).astype(bool)
    keys = np.asarray([str(v) for v in values], dtype=object)
    if y.all() or not y.any():
        return None
    share = {k: y[keys == k].mean() for k in set(keys.tolist())}
    return roc_auc(y, np.array([share[k] for k in keys]))


def paired_bootstrap(
    labels: np.ndarray,
    statistic: Callable[[np.ndarray], float | None],
    *,
    resamples: int = 1000,
    seed: int = 0,
    min_share: float = 0.5,
) -> tuple[float, float] | None:
    """95 % percentile bootstrap interval of `statistic` (a function of the indices of a
    resample of the studies, so that paired figures are resampled together); resamples
    with one class only, or where `statistic` is None, are left out. None when fewer than
    `min_share` of them count (or none does)."""
    y = np.asarray(labels).reshape(-1).astype(bool)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, y.size, y.size)
        if y[idx].all() or not y[idx].any():
            continue
        value = statistic(idx)
        if value is not None:
            values.append(value)
    if not values or len(values) < resamples * min_share:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def within_stratum_auc(
    labels: np.ndarray, scores: np.ndarray, strata: np.ndarray | list[object]
) -> tuple[float | None, int]:
    """The AUC over pairs of a positive and a negative study of the same stratum (pooled:
    each stratum weighted by its number of such pairs), and that number of pairs.

    What a score is worth once the stratum (the view, say) is held fixed: a model that ranks
    by the view alone gets 0.5 here, whatever its overall AUC. (None, 0) without such a pair.
    """
    y, s = _as_arrays(labels, scores)
    keys = np.asarray([str(v) for v in strata], dtype=object)
    total, pairs = 0.0, 0
    for key in set(keys.tolist()):
        mask = keys == key
        n_pos, n_neg = int(y[mask].sum()), int((~y[mask]).sum())
        if n_pos and n_neg:
            total += roc_auc(y[mask], s[mask]) * n_pos * n_neg
            pairs += n_pos * n_neg
    return (total / pairs if pairs else None), pairs


def bootstrap_auc_interval(
    labels: np.ndarray, scores: np.ndarray, *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the AUC (cases resampled with replacement)."""
    y, s = _as_arrays(labels, scores)
    interval = paired_bootstrap(
        y, lambda i: roc_auc(y[i], s[i]), resamples=resamples, seed=seed, min_share=0.0
    )
    if interval is None:
        raise ValueError("no bootstrap resample holds both classes")
    return interval


def paired_auc_difference(
    labels: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, tuple[float, float] | None]:
    """AUC of `second` minus AUC of `first` on the same cases, with its 95 % paired
    bootstrap interval (both scores resampled together, so that what the two models share,
    the cases, cancels out of the difference); None for the interval when too few
    resamples hold both classes."""
    y, a = _as_arrays(labels, first)
    _, b = _as_arrays(labels, second)
    difference = roc_auc(y, b) - roc_auc(y, a)
    interval = paired_bootstrap(
        y, lambda i: roc_auc(y[i], b[i]) - roc_auc(y[i], a[i]), resamples=resamples, seed=seed
    )
    return difference, interval


def unpaired_auc_difference_interval(
    labels_1: np.ndarray,
    scores_1: np.ndarray,
    labels_0: np.ndarray,
    scores_0: np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """95 % bootstrap interval of AUC(set 1) - AUC(set 0) on two independent sets of cases
    (each resampled on its own: different studies, e.g. a month against the months before);
    None when fewer than half the resamples hold both classes in both sets."""
    y1, s1 = _as_arrays(labels_1, scores_1)
    y0, s0 = _as_arrays(labels_0, scores_0)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        i = rng.integers(0, y1.size, y1.size)
        j = rng.integers(0, y0.size, y0.size)
        if y1[i].all() or not y1[i].any() or y0[j].all() or not y0[j].any():
            continue
        values.append(roc_auc(y1[i], s1[i]) - roc_auc(y0[j], s0[j]))
    if len(values) < resamples / 2:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def expected_calibration_error(
    labels: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE: bin-weighted mean gap between the mean score and the positive rate."""
    y, s = _as_arrays(labels, scores)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(s, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(s[mask].mean() - y[mask].mean())
    return float(total)


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (Youden's J).

    A case is positive when ``score >= threshold``. Ties are broken towards the higher
    sensitivity (the lower threshold), the safer side for a triage flag.
    """
    y, s = _as_arrays(labels, scores)
    candidates = np.unique(s)
    best_j, best_t = -np.inf, float(candidates[0])
    n_pos, n_neg = y.sum(), (~y).sum()
    for t in candidates:
        predicted = s >= t
        j = (predicted & y).sum() / n_pos + (~predicted & ~y).sum() / n_neg - 1.0
        if j > best_j:
            best_j, best_t = j, float(t)
    return best_t


def fit_platt(labels: np.ndarray, logits: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """Scale `a` and bias `c` minimising the log loss of ``sigmoid(a * logit + c)`` (Newton).

    Platt scaling generalises temperature scaling (``a = 1 / T``, ``c = 0``) with a bias,
    which also corrects the shift that class weighting puts into the scores. With a > 0 the
    ranking (so the AUC) is unchanged. Fitted on the validation split.
    """
    y, z = _as_arrays(labels, logits)
    target = y.astype(np.float64)
    features = np.stack([z, np.ones_like(z)], axis=1)

    def loss(params: np.ndarray) -> float:
        t = features @ params
        return float(np.where(y, np.logaddexp(0.0, -t), np.logaddexp(0.0, t)).mean())

    params = np.array([1.0, 0.0])
    current = loss(params)
    for _ in range(iterations):
        p = np.exp(-np.logaddexp(0.0, -(features @ params)))
        gradient = features.T @ (p - target)
        hessian = (features * (p * (1 - p))[:, None]).T @ features + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        # damped Newton: halve the step until the loss goes down (plain Newton overshoots
        # from a far start with large logits)
        for _ in range(40):
            candidate = params - step
            value = loss(candidate)
            if value <= current:
                break
            step = step / 2.0
        else:
            break
        params, improvement, current = candidate, current - value, value
        if improvement < 1e-12:
            break
    return float(params[0]), float(params[1])


def ks_statistic(first: np.ndarray, second: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest distance between the two
    samples' empirical distribution functions (0 when either sample is empty)."""
    a = np.asarray(first, dtype=np.float64).reshape(-1, 1)
    b = np.asarray(second, dtype=np.float64).reshape(-1, 1)
    return float(ks_statistics(a, b)[0])


def ks_statistics(
    first: np.ndarray, second: np.ndarray, *, second_sorted: bool = False
) -> np.ndarray:
    """:func:`ks_statistic` of each column of `first` (n, J) against the same column of
    `second` (m, J; `second_sorted` when each column is sorted already, as a monitor's
    reference is, period after period).

    Read at the values of `first` only, from both sides of each: between two of them the
    first sample's distribution function stays put while the second's rises, so the
    largest distance lies at one end of the gap; ties are exact. n log m per column.
    """
    a = np.sort(np.asarray(first, dtype=np.float64), axis=0)
    b = np.asarray(second, dtype=np.float64)
    if not second_sorted:
        b = np.sort(b, axis=0)
    n, m = len(a), len(b)
    if not n or not m:
        return np.zeros(a.shape[1])
    out = np.empty(a.shape[1])
    for j in range(a.shape[1]):
        x, y = a[:, j], b[:, j]
        right = np.searchsorted(x, x, "right") / n - np.searchsorted(y, x, "right") / m
        left = np.searchsorted(x, x, "left") / n - np.searchsorted(y, x, "left") / m
        out[j] = max(np.abs(right).max(), np.abs(left).max())
    return out


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for Kolmogorov's limiting distribution, ``2 sum (-1)^(k-1) exp(-2 k^2 x^2)``."""
    if x < 0.2:  # the series converges slowly here, and the answer is 1 to 1e-20
        return 1.0
    total, k = 0.0, 1
    while k <= 100:
        term = math.exp(-2.0 * k * k * x * x)
        total += term if k % 2 else -term
        if term < 1e-16 * max(total, 1e-300):
            break
        k += 1
    return float(min(1.0, max(0.0, 2.0 * total)))


def _ks_scale(n: int, m: int) -> float:
    """Stephens' factor that turns a two-sample D into Kolmogorov's x for samples of `n` and
    `m` (``sqrt(ne) + 0.12 + 0.11 / sqrt(ne)``, ``ne = n m / (n + m)``): accurate for
    samples of four and more (Stephens, JRSS B 32, 1970; Numerical Recipes 14.3)."""
    root = math.sqrt(n * m / (n + m))
    return root + 0.12 + 0.11 / root


def ks_pvalue(statistic: float, n: int, m: int) -> float:
    """The two-sided p-value of a two-sample KS `statistic` of samples of `n` and `m`."""
    return kolmogorov_sf(_ks_scale(n, m) * statistic)


def ks_critical(alpha: float, n: int, m: int) -> float:
    """The KS statistic above which samples of `n` and `m` differ at level `alpha` (the
    inverse of :func:`ks_pvalue`: Newton's method from the first term of the series,
    ``sqrt(-ln(alpha / 2) / 2)``, which is already exact to 1e-4 below alpha = 0.2)."""
    x = math.sqrt(-math.log(alpha / 2.0) / 2.0)
    for _ in range(20):
        # d/dx of the series: 8 x sum (-1)^k k^2 exp(-2 k^2 x^2)
        slope = (
            8.0 * x * sum((-1) ** k * k * k * math.exp(-2.0 * k * k * x * x) for k in range(1, 20))
        )
        step = (kolmogorov_sf(x) - alpha) / slope if slope else 0.0
        x -= step
        if abs(step) < 1e-12:
            break
    return x / _ks_scale(n, m)


def share_test(count: int, n: int, reference_count: int, reference_n: int) -> float:
    """The two-sided p-value of a share `count / n` against `reference_count / reference_n`
    (two independent samples, pooled two-proportion z-test); 1.0 when the pooled share is 0
    or 1 (no variation, nothing to test)."""
    pooled = (count + reference_count) / (n + reference_n)
    if pooled <= 0.0 or pooled >= 1.0:
        return 1.0
    error = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n + 1.0 / reference_n))
    z = abs(count / n - reference_count / reference_n) / error
    return float(2.0 * NORMAL.cdf(-z))


def share_critical(alpha: float, pooled: float, n: int, reference_n: int) -> float:
    """The difference of shares beyond which :func:`share_test` rejects at level `alpha`,
    for a pooled share `pooled` and samples of `n` and `reference_n`."""
    z = NORMAL.inv_cdf(1.0 - alpha / 2.0)
    return z * math.sqrt(max(pooled * (1.0 - pooled), 0.0) * (1.0 / n + 1.0 / reference_n))


@dataclass(frozen=True, slots=True)
class SplitMetrics:
    """Metrics of one split at one operating threshold."""

    n: int
    n_positive: int
    auc: float
    auc_ci95: tuple[float, float]
    accuracy: float
    sensitivity: float
    specificity: float
    ece: float

    def as_dict(self, prefix: str) -> dict[str, float | int | list[float]]:
        """Flat dict with keys like ``test_auc`` (the names the model card uses)."""
        out: dict[str, float | int | list[float]] = {}
        for key, value in asdict(self).items():
            out[f"{prefix}_{key}"] = list(value) if isinstance(value, tuple) else value
        return out


def split_metrics(
    labels: np.ndarray, scores: np.ndarray, threshold: float, *, seed: int = 0
) -> SplitMetrics:
    """All card metrics of one split at `threshold` (positive when score >= threshold)."""
    y, s = _as_arrays(labels, scores)
    predicted = s >= threshold
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    return SplitMetrics(
        n=int(y.size),
        n_positive=n_pos,
        auc=roc_auc(y, s),
        auc_ci95=bootstrap_auc_interval(y, s, seed=seed),
        accuracy=float((predicted == y).mean()),
        sensitivity=float((predicted & y).sum() / n_pos) if n_pos else float("nan"),
        specificity=float((~predicted & ~y).sum() / n_neg) if n_neg else float("nan"),
        ece=expected_calibration_error(y, s),
    )
