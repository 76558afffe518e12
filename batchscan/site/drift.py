"""Drift measured from the films themselves: each period of study date against a reference,
from the state and the model-input store only, days before reports could tell.

Why: the report-based alarms (:mod:`batchscan.site.monitoring`) need a RIS export, wait for
the reports, and need enough studies of each class before they can say anything; the
failures that hit a deployed chest X-ray model are shifts in its input (a new detector or
new post-processing, more bedside films, images of another body part leaking in, a new
population, a change in prevalence), and those show in the films first. CheXstray
(arXiv 2202.02833) watches the DICOM metadata, image embeddings and the model's scores
together without ground truth; Kore et al. (Nature Communications 2024) found combined
detectors the most sensitive and performance alone a poor proxy for shift. This module
does the same with what batchscan keeps anyway, and opens no archive file.

What is compared, period by period (``day``, ``week`` or ``month`` of study date,
:func:`batchscan.site.monitoring.period_starts`), with the reference (the first
:data:`~batchscan.site.monitoring.REFERENCE_PERIODS` periods holding :data:`MIN_IMAGES`
scored images, or the studies dated ``FROM..TO``), one row per signal (:data:`SIGNALS`):

* the header mix of the scored images (device, view, age band, modality, image matrix,
  transfer syntax, photometric interpretation, pixel spacing band): for each value its
  share against the reference's, by a two-proportion test; the value whose share moved
  most significantly speaks for the signal;
* the image statistics of a sample of the stored 64 x 64 inputs (:func:`image_statistics`:
  grey levels, contrast, sharpness, the border, left-right symmetry, orientation), each by
  a two-sample Kolmogorov-Smirnov test;
* the model's penultimate features of the same sample (the layer the OOD check reads,
  :meth:`batchscan.scoring.infer.Scorer.features`), projected on the reference's first
  :data:`FEATURE_COMPONENTS` principal components, each by a KS test (Rabanser et al.,
  "Failing Loudly", NeurIPS 2019: univariate KS tests on a reduced representation, with a
  Bonferroni correction, detect shift as well as multivariate kernel tests, at a fraction of
  the cost, and say which direction moved);
* the share of sampled images beyond the reference's range (``unusual``: a leak of other
  images moves the tail before the body, see ``_unusual``);
* the scores: their distribution (KS), the share of studies flagged and of images beyond
  the training set (``ood``).

False alarms, across the many comparisons: a signal made of several tests (the values of a
header fact, the image statistics, the components) is significant when its smallest p-value
times the number of its tests (Bonferroni) lies below :data:`ALPHA` divided by the number of
signals (Bonferroni again), so each period has at most a chance of :data:`ALPHA` of any
signal being significant on stable data; a change must also be large enough to matter
(:data:`MIN_SHARE_CHANGE`, :data:`MIN_DISTANCE`), which a month of thirty thousand studies
would otherwise find in noise; and a signal alarms only when it was significant in
:data:`PERSISTENCE` consecutive judged periods (two days; one week or month). Measured on
simulated timelines of real films (``jobs/experiments/drift_check.py``, quoted on
docs/site/lifecycle.md): no false alarm in three stable years at 50 and at 200 studies a
day.

Cost (a million stored inputs, 2 cores): the header facts and scores of every scored file
are read from the state (one narrow query); the pictures are looked at only for a sample of
:data:`SAMPLE_PER_PERIOD` images a period, chosen by a hash of the path so that it stays the
same from night to night, and what is derived from each (statistics and features, one
forward pass) is kept in the input store
(:meth:`batchscan.scoring.input_store.InputStore.put_derived`), so a night makes only the
new periods' (at most :data:`MAX_NEW_PER_RUN`,
reference first, then the newest periods: the first run on an old archive catches up over a
few weeks of nights instead of taking an hour at once).

A period with fewer than :data:`MIN_IMAGES` scored images has no rows and warns about
nothing; undated studies are left out.
"""

from __future__ import annotations

import calendar
import functools
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from itertools import pairwise
from typing import Any, Final, ParamSpec

import numpy as np
import pandas as pd
from pydicom.uid import UID

from batchscan.ingest.preprocess import INPUT_SIZE
from batchscan.results.report import DRIFT_SCHEMA
from batchscan.results.state import StateStore
from batchscan.scoring.input_store import InputStore
from batchscan.site import metrics
from batchscan.site.monitoring import (
    latest_full_period,
    period_starts,
    reference_rows,
)

log = logging.getLogger("batchscan")

#: The columns of drift.parquet and drift.csv.
DRIFT_COLUMNS: Final = tuple(DRIFT_SCHEMA.names)

#: The signals, each with what it compares (the detail sentences use the text).
SIGNALS: Final = {
    "device": "manufacturer and model",
    "view": "view",
    "age": "age band",
    "modality": "modality",
    "matrix": "image matrix (long edge)",
    "transfer_syntax": "transfer syntax",
    "photometric": "photometric interpretation",
    "spacing": "pixel spacing band",
    "image": "image statistics of the stored inputs",
    "features": "the model's penultimate features",
    "score": "model score",
    "flag_rate": "studies flagged",
    "ood_rate": "images beyond the training set (ood)",
    "unusual": "images unlike the reference's (statistics or features beyond its range)",
}
#: The header facts of :data:`SIGNALS` (one categorical value per scored image).
HEADER_SIGNALS: Final = (
    "device",
    "view",
    "age",
    "modality",
    "matrix",
    "transfer_syntax",
    "photometric",
    "spacing",
)
#: The file columns the monitor reads from the state.
FILE_COLUMNS: Final = (
    "path",
    "size",
    "mtime_ns",
    "study_date",
    "manufacturer",
    "manufacturer_model",
    "view",
    "patient_age_years",
    "modality",
    "rows",
    "columns",
    "transfer_syntax_uid",
    "photometric",
    "pixel_spacing_mm",
    "score",
    "ood",
)
#: The statistics :func:`image_statistics` computes on a model input, with what they are.
IMAGE_STATISTICS: Final = {
    "brightness": "mean grey level",
    "contrast": "standard deviation of the grey levels",
    "dark_end": "5th percentile of the grey levels",
    "midtone": "median grey level",
    "bright_end": "95th percentile of the grey levels",
    "sharpness": "mean absolute Laplacian",
    "border": "mean grey level of the outer eighth",
    "asymmetry": "mean left-right difference",
    "orientation": "horizontal against vertical edges (log ratio)",
}
#: Age bands of the ``age`` signal (lower edges in years; the last is open).
AGE_BANDS: Final = (0, 1, 5, 12, 18, 40, 65)
#: Width of the ``matrix`` signal's bands of the long edge, in pixels.
MATRIX_BAND: Final = 512
#: Width of the ``spacing`` signal's bands of the pixel spacing, in mm: detectors' pitches lie
#: 0.1-0.2 mm apart by a few hundredths (CR plates 0.1, flat panels 0.139-0.2), so a band this
#: wide tells most detectors apart without splitting one detector's calibrated values.
SPACING_BAND: Final = 0.025

#: Chance, per period, that any signal is significant on stable data (Bonferroni over the
#: signals and over each signal's tests).
ALPHA: Final = 0.01
#: The level at which a weekday's days in the reference differ from its other days in a
#: signal (a weekly rhythm), so that a day is compared in that signal with its weekday's
#: days only (see :func:`_weekdays`).
RHYTHM_ALPHA: Final = 0.01
#: Consecutive judged periods a signal must be significant in before it alarms.
PERSISTENCE: Final = {"day": 2, "week": 1, "month": 1}
#: The smallest change that may alarm: a share moving by 3 points, a KS distance of 0.1.
MIN_SHARE_CHANGE: Final = 0.03
MIN_DISTANCE: Final = 0.10
#: Scored images a period needs to be judged (and to be one of the reference's).
MIN_IMAGES: Final = 30
#: Stored inputs of a period looked at (image statistics and features).
SAMPLE_PER_PERIOD: Final = 250
#: Vectors (statistics and features) a run makes at most; the rest wait for the next runs
#: (3.8 ms of CPU each, measured: 5,000 keep a catching-up night at a million stored inputs
#: within the minute, jobs/bench/drift_benchmark.py).
MAX_NEW_PER_RUN: Final = 5_000
#: Share of the reference's images beyond its range by construction (``unusual``), and the
#: shrinkage of the covariance its distance uses.
UNUSUAL_SHARE: Final = 0.02
UNUSUAL_SHRINKAGE: Final = 0.1
#: Principal components of the reference's features that are compared.
FEATURE_COMPONENTS: Final = 8
#: Inputs read and pushed through the model at once.
BATCH: Final = 512

#: Made from model inputs (N, 64, 64, 3) -> features (N, units).
FeatureMaker = Callable[[np.ndarray], np.ndarray]
_P = ParamSpec("_P")


def image_statistics(inputs: np.ndarray) -> np.ndarray:
    """The :data:`IMAGE_STATISTICS` of model inputs (N, 64, 64, 3) or (N, 64, 64), float32
    (N, 9): what a new detector, other post-processing (contrast, gamma, sharpening),
    collimation, another body part or a film stored turned (an upright chest has more
    horizontal edges than vertical ones: ribs, diaphragm, clavicles) moves in the picture
    the model sees."""
    grey = np.asarray(inputs, dtype=np.float32)
    if grey.ndim == 4:
        grey = grey[..., 0]
    n = len(grey)
    flat = grey.reshape(n, -1)
    low, middle, high = np.percentile(flat, [5, 50, 95], axis=1)
    laplacian = (
        4.0 * grey[:, 1:-1, 1:-1]
        - grey[:, :-2, 1:-1]
        - grey[:, 2:, 1:-1]
        - grey[:, 1:-1, :-2]
        - grey[:, 1:-1, 2:]
    )
    edge = max(INPUT_SIZE // 8, 1)
    inner = grey[:, edge:-edge, edge:-edge].reshape(n, -1).sum(axis=1)
    border = (flat.sum(axis=1) - inner) / (flat.shape[1] - (INPUT_SIZE - 2 * edge) ** 2)
    return np.stack(
        [
            flat.mean(axis=1),
            flat.std(axis=1),
            low,
            middle,
            high,
            np.abs(laplacian).reshape(n, -1).mean(axis=1),
            border,
            np.abs(grey - grey[:, :, ::-1]).reshape(n, -1).mean(axis=1),
            np.log(
                (np.abs(np.diff(grey, axis=2)).reshape(n, -1).mean(axis=1) + 1e-6)
                / (np.abs(np.diff(grey, axis=1)).reshape(n, -1).mean(axis=1) + 1e-6)
            ),
        ],
        axis=1,
    ).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Sample:
    """What was derived from the sampled inputs: their study dates (k,), their
    :func:`image_statistics` (k, 9) and their features (k, units; units may be 0)."""

    study_dates: pd.Series
    statistics: np.ndarray
    features: np.ndarray


@dataclass(slots=True)
class Drifted:
    """What one drift pass gives the scan: the frame to write (:data:`DRIFT_COLUMNS`), the
    ``WARNING: drift`` line or None, facts for the manifest, and why the monitor could not
    run (`error`: then the frame is empty and the last good drift files stay)."""

    frame: pd.DataFrame
    warning: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def header_values(images: pd.DataFrame) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Each header signal's value of each image row, as codes (N,) into its list of values
    (``unknown`` when missing); made on the distinct values, so a million rows cost little."""

    def coded(values: pd.Series, name: Callable[[Any], str]) -> tuple[np.ndarray, list[str]]:
        codes, uniques = pd.factorize(values.astype(object).where(values.notna(), None))
        labels = [name(v) for v in uniques]
        if (codes < 0).any():
            codes = np.where(codes < 0, len(labels), codes)
            labels.append("unknown")
        merged, index = np.unique(np.array(labels, dtype=object), return_inverse=True)
        return index[codes].astype(np.int64), [str(v) for v in merged]

    def text(value: Any) -> str:
        return str(value).strip() or "unknown"

    device = (
        images["manufacturer"]
        .fillna("unknown")
        .astype(str)
        .str.cat(images["manufacturer_model"].fillna("").astype(str), sep=" ")
    )
    age = pd.to_numeric(images["patient_age_years"], errors="coerce")
    edges = [*AGE_BANDS, np.inf]
    bands = [
        f"{lo} years and over"
        if hi == np.inf
        else f"under {hi} year"
        if lo == 0
        else f"{lo}-{hi - 1} years"
        for lo, hi in pairwise(edges)
    ]
    long_edge = np.fmax(
        pd.to_numeric(images["rows"], errors="coerce").to_numpy(dtype=np.float64),
        pd.to_numeric(images["columns"], errors="coerce").to_numpy(dtype=np.float64),
    )
    band = pd.Series(np.floor(long_edge / MATRIX_BAND) * MATRIX_BAND)
    spacing = pd.to_numeric(images["pixel_spacing_mm"], errors="coerce").to_numpy(np.float64)
    return {
        "device": coded(device, text),
        "view": coded(images["view"], text),
        "age": coded(
            pd.Series(np.searchsorted(edges, age.to_numpy(), side="right") - 1).where(
                age.notna().to_numpy()
            ),
            lambda i: bands[int(i)],
        ),
        "modality": coded(images["modality"], text),
        "matrix": coded(band, lambda v: f"{int(v)}-{int(v) + MATRIX_BAND - 1} px"),
        "transfer_syntax": coded(
            images["transfer_syntax_uid"], lambda uid: UID(str(uid)).name or str(uid)
        ),
        "photometric": coded(images["photometric"], text),
        "spacing": coded(
            pd.Series(np.floor(spacing / SPACING_BAND + 1e-9) * SPACING_BAND),
            lambda v: f"{v:.3f}-{v + SPACING_BAND:.3f} mm",
        ),
    }


def _percent(share: float) -> str:
    return f"{100 * share:.0f} %"


@dataclass(frozen=True, slots=True)
class _Tested:
    """One signal of one period: the statistic (a share's change or a KS distance), the
    value it had to exceed, the Bonferroni p-value over the signal's tests, and a sentence."""

    statistic: float
    threshold: float
    p_value: float
    n: int
    detail: str


def _shares(
    counts: np.ndarray, reference: np.ndarray, labels: list[str], level: float, what: str
) -> _Tested:
    """A categorical signal from the counts of each value in the period and in the
    reference: each value's share against the reference's (two-proportion tests,
    Bonferroni over the values present); the value whose change passes the floor with the
    smallest p-value speaks for the signal, one that grew before one that shrank by as much
    (of two values, "DX 0 % -> 40 %" says what came, "CR 100 % -> 60 %" only that it
    did)."""
    n, n0 = int(counts.sum()), int(reference.sum())
    present = np.flatnonzero((counts + reference) > 0)
    tests = []
    for c in present:
        k, k0 = int(counts[c]), int(reference[c])
        change = k / n - k0 / n0
        p = metrics.share_test(k, n, k0, n0)
        tests.append((abs(change) < MIN_SHARE_CHANGE, p, -abs(change), change < 0, c))
    _, p, _, _, c = min(tests)
    k, k0 = int(counts[c]), int(reference[c])
    critical = metrics.share_critical(level / len(present), (k + k0) / (n + n0), n, n0)
    return _Tested(
        statistic=abs(k / n - k0 / n0),
        threshold=max(MIN_SHARE_CHANGE, critical),
        p_value=min(1.0, p * len(present)),
        n=n,
        detail=f"{what} {labels[c]}: {_percent(k0 / n0)} -> {_percent(k / n)} of images",
    )


def _rate(k: int, n: int, k0: int, n0: int, level: float, what: str) -> _Tested:
    """A share signal of one yes/no fact (flagged, ood): `k` of `n` against `k0` of `n0`."""
    return _Tested(
        statistic=abs(k / n - k0 / n0),
        threshold=max(MIN_SHARE_CHANGE, metrics.share_critical(level, (k + k0) / (n + n0), n, n0)),
        p_value=metrics.share_test(k, n, k0, n0),
        n=n,
        detail=f"{what}: {_percent(k0 / n0)} -> {_percent(k / n)}",
    )


def _distributions(
    values: np.ndarray, reference: np.ndarray, level: float, names: list[str], scale: np.ndarray
) -> _Tested:
    """A signal of one or more continuous measures (columns; `reference` sorted by column):
    a two-sample KS test each, Bonferroni over them; the column with the smallest p-value
    speaks for the signal, in a sentence of what its KS distance is: the share of images at
    or below the value (in `scale` units, 1 for raw values) where the two distributions lie
    furthest apart. (A median says less: a new device's films are a mode of their own, and
    the median of the mixture may not move at all.)"""
    n, n0 = len(values), len(reference)
    distances = metrics.ks_statistics(values, reference, second_sorted=True)
    p_values = [metrics.ks_pvalue(float(d), n, n0) for d in distances]
    j = int(np.argmin(p_values))
    mine, theirs = np.sort(values[:, j]), reference[:, j]
    points = np.concatenate([mine, theirs])
    now = np.searchsorted(mine, points, side="right") / n
    before = np.searchsorted(theirs, points, side="right") / n0
    at = int(np.argmax(np.abs(now - before)))
    return _Tested(
        statistic=float(distances[j]),
        threshold=max(MIN_DISTANCE, metrics.ks_critical(level / len(distances), n, n0)),
        p_value=min(1.0, p_values[j] * len(distances)),
        n=n,
        detail=f"{names[j]}: {_percent(before[at])} -> {_percent(now[at])} of images at or "
        f"below {points[at] / scale[j]:.3g} (KS distance {distances[j]:.2f})",
    )


def _unusual(values: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which sampled images lie beyond the reference's range, and which are the reference's
    held-out half (whose share beyond it is the reference's rate): (flags (k,), held (k,)).

    A leak of other images (another body part, adults, other processing of some films)
    moves the tail of a distribution before its body: 10 % of films unlike the rest move a
    KS distance by at most 0.1, which a day of 200 studies cannot tell from noise, while
    their share beyond the reference's range rises from :data:`UNUSUAL_SHARE` by up to 10
    points. An image's distance is its Mahalanobis distance to one half of the reference,
    over the image statistics and the features together (standardised, covariance shrunk
    by :data:`UNUSUAL_SHRINKAGE` towards the identity: a hundred images cannot estimate
    seventy dimensions); the threshold is the (1 - :data:`UNUSUAL_SHARE`) quantile of the
    other half's distances, so the reference's own rate is measured on images the distance
    was not fitted on (split conformal). Measured against the alternatives on the
    calibration films (``jobs/experiments/drift_check.py``): a robust z-score per measure
    saw 0 % of adults and turned films beyond the range, this sees 34 % and 11 %.
    """
    rows = np.flatnonzero(base)
    fit, held = rows[0::2], rows[1::2]
    centre = values[fit].mean(axis=0)
    spread = values[fit].std(axis=0)
    spread = np.where(spread > 1e-9, spread, 1.0)
    standard = (values - centre) / spread
    covariance = np.atleast_2d(np.cov(standard[fit], rowvar=False))
    covariance = (1.0 - UNUSUAL_SHRINKAGE) * covariance + UNUSUAL_SHRINKAGE * np.eye(
        len(covariance)
    )
    precision = np.linalg.inv(covariance)
    distance = np.einsum("ij,jk,ik->i", standard, precision, standard)
    threshold = np.quantile(distance[held], 1.0 - UNUSUAL_SHARE)
    held_out = np.zeros(len(values), dtype=bool)
    held_out[held] = True
    return distance > threshold, held_out


def _projection(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre, axes (units, k) and standard deviations of the reference's first principal
    components (at most :data:`FEATURE_COMPONENTS`, those with any variance)."""
    centre = features.mean(axis=0)
    variance, axes = np.linalg.eigh(
        np.cov(features - centre, rowvar=False).reshape(features.shape[1], features.shape[1])
    )
    order = np.argsort(variance)[::-1]
    variance, axes = np.maximum(variance[order], 0.0), axes[:, order]
    keep = int(min(FEATURE_COMPONENTS, (variance > 1e-12 * max(variance.max(), 1e-30)).sum()))
    return centre, axes[:, :keep], np.sqrt(variance[:keep])


class _Periods:
    """The periods of study date, as integer codes of a sorted list of starts (-1: undated),
    and which rows of a frame fall in each (one grouping, reused for every signal)."""

    def __init__(self, starts: pd.Series) -> None:
        self.codes, uniques = pd.factorize(starts, sort=True)
        self.starts = pd.DatetimeIndex(uniques)

    def codes_of(self, starts: pd.Series) -> np.ndarray:
        """Codes of other rows' starts (-1 for a start with no scored image)."""
        return self.starts.get_indexer(pd.DatetimeIndex(starts))

    def groups(self, codes: np.ndarray) -> list[np.ndarray]:
        """Row positions of each period, for rows with these `codes`."""
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(self.starts) + 1))
        return [order[bounds[i] : bounds[i + 1]] for i in range(len(self.starts))]


@dataclass(frozen=True, slots=True)
class _Reference:
    """What a judged period is compared with, for every signal: the counts of each header
    value, the sorted scores, the OOD and flag counts, the sorted sampled measures and the
    held-out share beyond the reference's range (``unusual``) of the reference's rows: all
    of them, or those of one day of the week."""

    tables: dict[str, np.ndarray]
    score: np.ndarray
    ood: tuple[int, int]
    flags: tuple[int, int]
    sampled: dict[str, np.ndarray]
    unusual: tuple[int, int] | None

    def rhythm(self, rest: _Reference) -> set[str]:
        """The signals in which this part of the reference (one weekday's days) differs from
        the `rest` at :data:`RHYTHM_ALPHA` (Bonferroni inside a signal, as when judging)."""
        p_values: dict[str, float] = {}
        for name, mine in self.tables.items():
            theirs = rest.tables[name]
            n, m = int(mine.sum()), int(theirs.sum())
            present = np.flatnonzero((mine + theirs) > 0)
            if n and m:
                tests = [metrics.share_test(int(mine[c]), n, int(theirs[c]), m) for c in present]
                p_values[name] = min(tests) * len(present)
        measures = {
            "score": (self.score, rest.score),
            **{name: (values, rest.sampled[name]) for name, values in self.sampled.items()},
        }
        for name, (mine, theirs) in measures.items():
            if len(mine) and len(theirs):
                distances = metrics.ks_statistics(mine, theirs, second_sorted=True)
                p = min(metrics.ks_pvalue(float(d), len(mine), len(theirs)) for d in distances)
                p_values[name] = p * len(distances)
        rates = {"flag_rate": (self.flags, rest.flags), "ood_rate": (self.ood, rest.ood)}
        if self.unusual is not None and rest.unusual is not None:
            rates["unusual"] = (self.unusual, rest.unusual)
        for name, (mine, theirs) in rates.items():
            if mine[1] and theirs[1]:
                p_values[name] = metrics.share_test(*mine, *theirs)
        return {name for name, p in p_values.items() if p < RHYTHM_ALPHA}

    def mixed(self, whole: _Reference, signals: set[str]) -> _Reference:
        """This part for `signals`, the `whole` reference for the others."""

        def pick(name: str) -> _Reference:
            return self if name in signals else whole

        return _Reference(
            tables={name: pick(name).tables[name] for name in self.tables},
            score=pick("score").score,
            ood=pick("ood_rate").ood,
            flags=pick("flag_rate").flags,
            sampled={name: pick(name).sampled[name] for name in self.sampled},
            unusual=pick("unusual").unusual,
        )


def judge(
    images: pd.DataFrame,
    studies: pd.DataFrame,
    period: str,
    sample: Sample | None = None,
    reference: tuple[date, date] | None = None,
) -> Drifted:
    """Compare each period with the reference (see the module's description).

    Parameters
    ----------
    images:
        One row per scored image: ``study_date`` and the :data:`FILE_COLUMNS` the header
        signals read, ``score`` and ``ood`` (None when the model has no OOD statistics).
    studies:
        One row per scored study: ``study_date``, ``flag``.
    period:
        ``day``, ``week`` or ``month``; a day is compared with the reference's days of its
        weekday (:func:`_weekdays`).
    sample:
        What was derived from a sample of the stored inputs, or None (no image or feature
        signal).
    reference:
        The studies dated FROM..TO as the reference, or None (the first periods).

    Returns
    -------
    Drifted
        The frame, the warning of the most recent period with :data:`MIN_IMAGES` scored
        images, and facts (the reference, the periods judged).
    """
    starts = period_starts(images["study_date"], period)
    periods = _Periods(starts)
    counts = np.bincount(periods.codes[periods.codes >= 0], minlength=len(periods.starts))
    base = _reference_rows(images["study_date"], starts, period, reference)
    base_starts = set(starts[base].dropna().unique())
    if int(base.sum()) < MIN_IMAGES:
        return Drifted(
            pd.DataFrame(columns=list(DRIFT_COLUMNS)),
            facts={"periods_judged": 0, "reference": "too few scored images for a reference"},
        )

    def in_reference(dates: pd.Series, codes: np.ndarray) -> np.ndarray:
        if reference is not None:
            days = pd.to_datetime(dates, errors="coerce")
            inside = (days >= pd.Timestamp(reference[0])) & (days <= pd.Timestamp(reference[1]))
            return inside.to_numpy(dtype=bool)
        wanted = np.array([s in base_starts for s in periods.starts], dtype=bool)
        return (codes >= 0) & wanted[np.maximum(codes, 0)]

    level = ALPHA / len(SIGNALS)
    headers = header_values(images)
    known = periods.codes >= 0
    tables = {
        name: np.bincount(
            periods.codes[known] * len(labels) + codes[known],
            minlength=len(periods.starts) * len(labels),
        ).reshape(len(periods.starts), len(labels))
        for name, (codes, labels) in headers.items()
    }
    image_groups = periods.groups(periods.codes)
    score = images["score"].to_numpy(dtype=np.float64)[:, None]
    ood_known = images["ood"].notna().to_numpy()
    ood = images["ood"].fillna(False).to_numpy(dtype=bool)
    study_codes = periods.codes_of(period_starts(studies["study_date"], period))
    flags = studies["flag"].fillna(False).to_numpy(dtype=bool)
    study_groups = periods.groups(study_codes)
    study_base = in_reference(studies["study_date"], study_codes)

    sampled: dict[str, tuple[np.ndarray, list[str], np.ndarray]] = {}
    sample_groups: list[np.ndarray] = [np.empty(0, np.int64)] * len(periods.starts)
    sample_codes = np.empty(0, np.int64)
    sample_base = np.zeros(0, dtype=bool)
    if sample is not None and len(sample.statistics):
        sample_codes = periods.codes_of(period_starts(sample.study_dates, period))
        sample_groups = periods.groups(sample_codes)
        sample_base = in_reference(sample.study_dates, sample_codes)
        if int(sample_base.sum()) >= MIN_IMAGES:
            stats = np.asarray(sample.statistics, dtype=np.float64)
            sampled["image"] = (
                stats,
                [f"{name} ({what})" for name, what in IMAGE_STATISTICS.items()],
                np.ones(stats.shape[1]),
            )
            features = np.asarray(sample.features, dtype=np.float64)
            if features.size:
                centre, axes, spread = _projection(features[sample_base])
                if axes.shape[1]:
                    k = axes.shape[1]
                    sampled["features"] = (
                        (features - centre) @ axes,
                        [f"principal component {j + 1} of {k}" for j in range(k)],
                        np.maximum(spread, 1e-12),
                    )
    unusual: np.ndarray | None = None
    held = np.zeros(0, dtype=bool)
    if sampled:  # the statistics and every unit of the features, not only the components
        assert sample is not None
        whole = np.concatenate([sample.statistics, sample.features], axis=1)
        unusual, held = _unusual(np.asarray(whole, dtype=np.float64), sample_base)

    def compared(rows: np.ndarray, study_rows: np.ndarray, sample_rows: np.ndarray) -> _Reference:
        """The reference made of these rows (masks of images, studies and the sample)."""
        known_rows = rows & ood_known
        return _Reference(
            tables={
                name: np.bincount(codes[rows], minlength=len(labels))
                for name, (codes, labels) in headers.items()
            },
            score=np.sort(score[rows], axis=0),
            ood=(int(ood[known_rows].sum()), int(known_rows.sum())),
            flags=(int(flags[study_rows].sum()), int(study_rows.sum())),
            sampled={
                name: np.sort(values[sample_rows], axis=0)
                for name, (values, _, _) in sampled.items()
            },
            unusual=None
            if unusual is None
            else (int(unusual[held & sample_rows].sum()), int((held & sample_rows).sum())),
        )

    everything = compared(base, study_base, sample_base)
    weekdays = _weekdays(period, starts, studies["study_date"], sample)
    strata: dict[int, _Reference] = {}
    rhythm: dict[str, list[str]] = {}

    def reference_of(i: int) -> _Reference:
        """The whole reference, or for a day, in each signal in which the reference's days
        of its weekday differ from its other days, those days (when they hold
        :data:`MIN_IMAGES` scored images, and as many sampled ones for the sampled
        signals)."""
        if weekdays is None:
            return everything
        day = int(periods.starts[i].day_of_week)
        if day not in strata:
            strata[day] = everything
            image_day, study_day, sample_day = (w == day for w in weekdays)
            if MIN_IMAGES <= int((base & image_day).sum()) < int(base.sum()):
                mine = compared(base & image_day, study_base & study_day, sample_base & sample_day)
                rest = compared(
                    base & ~image_day, study_base & ~study_day, sample_base & ~sample_day
                )
                differ = mine.rhythm(rest)
                if int((sample_base & sample_day).sum()) < MIN_IMAGES:  # too few pictures
                    differ -= {*sampled, "unusual"}
                strata[day] = mine.mixed(everything, differ)
                if differ:
                    rhythm[calendar.day_abbr[day]] = sorted(differ)
        return strata[day]

    rows: list[dict[str, Any]] = []
    for i, start in enumerate(periods.starts):
        if counts[i] < MIN_IMAGES:
            continue
        against = reference_of(i)
        tested: dict[str, _Tested] = {}
        for name, table in tables.items():
            labels = headers[name][1]
            tested[name] = _shares(table[i], against.tables[name], labels, level, SIGNALS[name])
        mine = image_groups[i]
        tested["score"] = _distributions(
            score[mine], against.score, level, [SIGNALS["score"]], np.ones(1)
        )
        if len(study_groups[i]) and against.flags[1]:
            group = study_groups[i]
            tested["flag_rate"] = _rate(
                int(flags[group].sum()), len(group), *against.flags, level, SIGNALS["flag_rate"]
            )
        known_ood = mine[ood_known[mine]]
        if len(known_ood) and against.ood[1]:
            tested["ood_rate"] = _rate(
                int(ood[known_ood].sum()), len(known_ood), *against.ood, level, SIGNALS["ood_rate"]
            )
        if len(sample_groups[i]) >= MIN_IMAGES:
            for name, (values, names, scale) in sampled.items():
                tested[name] = _distributions(
                    values[sample_groups[i]], against.sampled[name], level, names, scale
                )
            if unusual is not None and against.unusual is not None and against.unusual[1]:
                picked = unusual[sample_groups[i]]
                tested["unusual"] = _rate(
                    int(picked.sum()), len(picked), *against.unusual, level, SIGNALS["unusual"]
                )
        is_reference = (
            start in base_starts if reference is None else bool(base[image_groups[i]].all())
        )
        for name, result in tested.items():
            rows.append(
                {
                    "period_start": start.date(),
                    "signal": name,
                    "statistic": result.statistic,
                    "threshold": result.threshold,
                    "p_value": result.p_value,
                    "n": result.n,
                    "significant": bool(not is_reference and result.statistic > result.threshold),
                    "alarm": False,
                    "reference": is_reference,
                    "detail": f"{SIGNALS[name]}: {result.detail}"
                    if name in ("image", "features")
                    else result.detail,
                }
            )
    frame = _persist(pd.DataFrame(rows, columns=list(DRIFT_COLUMNS)), PERSISTENCE[period])
    judged = latest_full_period(starts, lambda rows: int(rows.sum()) >= MIN_IMAGES)
    reference_text = (
        f"studies dated {reference[0]} to {reference[1]}"
        if reference is not None
        else f"the {len(base_starts)} {period}s from {min(base_starts).date()} to "
        f"{_last_day(max(base_starts), period)}"
    )
    return Drifted(
        frame,
        warning=drift_warning(frame, period, judged, reference_text),
        facts={
            "period": period,
            "reference": reference_text,
            "reference_images": int(base.sum()),
            "periods_judged": int(frame["period_start"].nunique()) if len(frame) else 0,
            "alarms": int(frame["alarm"].sum()) if len(frame) else 0,
            **({"weekly_rhythm": rhythm} if weekdays is not None else {}),
        },
    )


def _last_day(start: pd.Timestamp, period: str) -> date:
    """The last day of the period that begins on `start`."""
    if period == "day":
        return start.date()
    if period == "week":
        return (start + pd.Timedelta(days=6)).date()
    return (start + pd.offsets.MonthEnd(0)).date()


def _reference_rows(
    study_dates: pd.Series,
    starts: pd.Series,
    period: str,
    reference: tuple[date, date] | None,
) -> np.ndarray:
    """The reference's images (a mask): the studies dated FROM..TO, or the first
    :data:`~batchscan.site.monitoring.REFERENCE_PERIODS` periods with :data:`MIN_IMAGES`
    scored images."""
    return reference_rows(
        study_dates, starts, period, lambda rows: int(rows.sum()) >= MIN_IMAGES, reference
    ).to_numpy(dtype=bool)


def _weekdays(
    period: str,
    starts: pd.Series,
    study_dates: pd.Series,
    sample: Sample | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """For day periods, the day of the week (0 Monday) of each image, study and sampled
    image (-1 undated); None for weeks and months.

    Why: a hospital's weekend is another hospital, with fewer studies, more bedside (AP)
    films, sicker patients; against a reference of all days a Saturday differs in its view
    mix, its pictures and its scores every week, and alarms every weekend (40.7 warnings a
    year on the simulated hospital of ``jobs/experiments/drift_check.py`` at 200 studies a
    day). So in each signal in which the reference's days of a weekday differ from its other
    days (at :data:`RHYTHM_ALPHA`: a weekly rhythm), a day of that weekday is compared with
    those days only (four of them in the default reference of four weeks,
    :data:`~batchscan.site.monitoring.REFERENCE_PERIODS`); in the other signals with the
    whole reference, whose larger size finds a small leak sooner (comparing every signal
    with the weekday's days alone took 22 days instead of 5 for a 10 % leak of non-chest
    films at 50 studies a day). A rhythm large enough to alarm a day is found in the
    reference: there four days of the weekday stand against the rest, where a judged day
    is one. A weekday whose days in the reference hold fewer than :data:`MIN_IMAGES` images
    (a short pinned reference, weekends too small to be judged) is compared with the whole
    reference."""
    if period != "day":
        return None

    def day_of(values: pd.Series) -> np.ndarray:
        days = pd.to_datetime(values, errors="coerce")
        return days.dt.day_of_week.fillna(-1).to_numpy(dtype=np.int64)

    sampled = day_of(sample.study_dates) if sample is not None else np.empty(0, np.int64)
    return day_of(starts), day_of(study_dates), sampled


def _persist(frame: pd.DataFrame, periods: int) -> pd.DataFrame:
    """``alarm``: significant in this and the `periods` - 1 judged periods before it (the
    reference's periods are not judged)."""
    if not len(frame):
        return frame
    frame = frame.sort_values(["signal", "period_start"], kind="stable").reset_index(drop=True)
    judged = ~frame["reference"]
    significant = frame["significant"].where(judged)
    run = (
        significant[judged]
        .groupby(frame.loc[judged, "signal"])
        .transform(lambda s: s.astype(int).rolling(periods, min_periods=periods).sum())
    )
    frame.loc[judged, "alarm"] = (run == periods).to_numpy()
    frame["alarm"] = frame["alarm"].astype(bool)
    return frame.sort_values(["period_start", "signal"], kind="stable").reset_index(drop=True)


def drift_warning(frame: pd.DataFrame, period: str, judged: Any, reference_text: str) -> str | None:
    """The one ``WARNING: drift`` line when the most recent period with :data:`MIN_IMAGES`
    scored images (`judged`) alarms, naming it, the signals and what moved; else None."""
    if judged is None or not len(frame):
        return None
    latest = frame[(frame["period_start"] == judged.date()) & frame["alarm"]]
    if not len(latest):
        return None
    latest = latest.sort_values("p_value")
    return (
        f"WARNING: drift: the {period} from {judged.date()} differs from the reference "
        f"({reference_text}) in {len(latest)} of {len(SIGNALS)} signals: "
        + "; ".join(latest["detail"])
        + "; see drift.csv and report.html"
    )


def sample_rows(
    paths: pd.Series, starts: pd.Series, per_period: int = SAMPLE_PER_PERIOD
) -> np.ndarray:
    """The positions of the sampled rows: in each period the `per_period` rows whose path
    hashes lowest (CRC-32), so that the sample stays the same from night to night and a
    period that grows keeps most of it."""
    keys = np.fromiter(
        (
            zlib.crc32(p if isinstance(p, bytes) else str(p).encode("utf-8", "surrogatepass"))
            for p in paths
        ),
        dtype=np.int64,
        count=len(paths),
    )
    order = pd.DataFrame({"start": starts.to_numpy(), "key": keys})
    order = order[order["start"].notna()].sort_values(["start", "key"], kind="stable")
    rank = order.groupby("start").cumcount()
    return np.sort(order.index[rank < per_period].to_numpy())


class _Clock:
    """Wall and CPU seconds of the monitor's parts, for the manifest and the benchmark (on
    a shared machine the CPU seconds are the steadier figure)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._since = (time.perf_counter(), time.process_time())

    def lap(self, name: str) -> None:
        """Charge the seconds since the last lap to `name`."""
        now = (time.perf_counter(), time.process_time())
        self.wall[name] = round(self.wall.get(name, 0.0) + now[0] - self._since[0], 3)
        self.cpu[name] = round(self.cpu.get(name, 0.0) + now[1] - self._since[1], 3)
        self._since = now


def _reported(monitor: Callable[_P, Drifted]) -> Callable[_P, Drifted]:
    """`monitor`, returning a fault as its ``error`` (logged with its traceback) instead of
    raising it: the monitor must never cost the run its reports."""

    @functools.wraps(monitor)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> Drifted:
        try:
            return monitor(*args, **kwargs)
        except Exception as exc:
            log.exception("drift monitor failed")
            empty = pd.DataFrame(columns=list(DRIFT_COLUMNS))
            return Drifted(empty, error=f"{type(exc).__name__}: {exc}")

    return guarded


@_reported
def monitor_drift(
    state: StateStore,
    store: InputStore | None,
    *,
    period: str,
    input_key: str,
    model_key: str,
    features: FeatureMaker | None,
    reference: tuple[date, date] | None = None,
    max_new: int = MAX_NEW_PER_RUN,
) -> Drifted:
    """The drift monitor on a REPORT_DIR's state and input store (the scan calls it at the
    end of every run; it opens no archive file). A fault in it comes back as the result's
    ``error``, never raised.

    Parameters
    ----------
    state, store:
        The scan's state and input store (None: no image or feature signal).
    period:
        ``day``, ``week`` or ``month``.
    input_key:
        The input key of the stored inputs to read (:func:`batchscan.results.keys.input_key`).
    model_key:
        What made the features (the model's version): a vector made by another model is
        made again.
    features:
        Model inputs -> penultimate features (:meth:`batchscan.scoring.infer.Scorer.features`),
        or None (image statistics only).
    reference:
        The studies dated FROM..TO as the reference (``--drift-reference``), or None.
    max_new:
        Vectors made at most in this run.
    """
    clock = _Clock()
    parts = list(state.scored_file_facts(FILE_COLUMNS))
    images = pd.DataFrame(
        {c: [v for part in parts for v in part[c]] for c in FILE_COLUMNS}, columns=FILE_COLUMNS
    )
    study_parts = list(state.study_facts(("study_date", "flag")))
    studies = pd.DataFrame(
        {c: [v for part in study_parts for v in part[c]] for c in ("study_date", "flag")}
    )
    images["ood"] = images["ood"].map(lambda v: None if v is None else bool(v)).astype(object)
    studies["flag"] = studies["flag"].astype(bool) if len(studies) else studies["flag"]
    clock.lap("read")

    sample, made, waiting = None, 0, 0
    starts = period_starts(images["study_date"], period)
    base = _reference_rows(images["study_date"], starts, period, reference)
    if store is not None and base.sum() >= MIN_IMAGES:  # else nothing to compare pictures with
        sample, made, waiting = _derive(
            images, starts, base, store, input_key, model_key, features, max_new, clock
        )
    clock.lap("make")  # (and "kept" within _derive)

    drifted = judge(images, studies, period, sample, reference)
    clock.lap("judge")
    drifted.facts.update(
        images=len(images),
        sampled=0 if sample is None else len(sample.statistics),
        vectors_made=made,
        vectors_waiting=waiting,
        seconds=clock.wall,
        cpu_seconds=clock.cpu,
    )
    return drifted


def _derive(
    images: pd.DataFrame,
    starts: pd.Series,
    base: np.ndarray,
    store: InputStore,
    input_key: str,
    model_key: str,
    features: FeatureMaker | None,
    max_new: int,
    clock: _Clock,
) -> tuple[Sample | None, int, int]:
    """The sample's vectors, from the store where kept, else made from the stored inputs
    (the reference's images, `base`, first, then the newest periods'): (sample, made, left
    for later runs); the reading of the kept ones is timed on `clock` as ``kept``."""
    picked = sample_rows(images["path"], starts)
    rows = images.iloc[picked]
    identities = list(
        zip(rows["path"], rows["size"].astype(int), rows["mtime_ns"].astype(int), strict=True)
    )
    key = model_key if features is not None else f"{model_key}:statistics"
    kept = store.derived(identities, input_key, key)
    missing = [i for i, identity in enumerate(identities) if identity[0] not in kept]
    if missing:
        first = base[picked]
        when = starts.iloc[picked].to_numpy()
        # reference first, then the newest periods first
        missing.sort(key=lambda i: (not first[i], -pd.Timestamp(when[i]).value))
    todo, waiting = missing[:max_new], max(0, len(missing) - max_new)
    clock.lap("kept")
    made = 0
    for start in range(0, len(todo), BATCH):
        batch = [identities[i] for i in todo[start : start + BATCH]]
        inputs = store.get(batch, input_key)
        have = [identity for identity in batch if identity[0] in inputs]
        if not have:
            continue
        stacked = np.stack([inputs[identity[0]] for identity in have])
        vectors = image_statistics(stacked)
        if features is not None:
            vectors = np.concatenate([vectors, features(stacked).astype(np.float32)], axis=1)
        store.put_derived(
            (identity, input_key, key, vector)
            for identity, vector in zip(have, vectors, strict=True)
        )
        kept.update({identity[0]: vector for identity, vector in zip(have, vectors, strict=True)})
        made += len(have)
    store.commit()
    found = [i for i, identity in enumerate(identities) if identity[0] in kept]
    if not found:
        return None, made, waiting
    vectors = np.stack([kept[identities[i][0]] for i in found])
    width = len(IMAGE_STATISTICS)
    return (
        Sample(
            study_dates=rows["study_date"].iloc[found].reset_index(drop=True),
            statistics=vectors[:, :width],
            features=vectors[:, width:],
        ),
        made,
        waiting,
    )
