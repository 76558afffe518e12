"""Monitoring against the radiologists' reports: how the model does, period by period, on
the studies the site's radiologists have reported, and which studies they disagree on.

Why here: a hospital gets a radiology report for every study, every day, and batchscan can
already turn reports into labels (:mod:`batchscan.site.report_labels`). So each scan with
``--reports-file`` labels the reports that are new or changed since the last run (a
report is known by its accession number and a digest of its text, in
``REPORT_DIR/report_labels.sqlite``, :mod:`batchscan.site.label_cache`; the text itself is
never kept), joins the labels to the studies the state holds, and measures:

* :func:`performance`: one row per day, ISO week (starting Monday) or calendar month of
  study date: studies labelled, pneumonia among them, the AUC with its 95 % bootstrap interval,
  sensitivity and specificity at the model's threshold;
* :func:`performance_warning`: a ``WARNING: performance`` line when the AUC of the most
  recent period with :data:`MIN_PER_CLASS` studies of each class (a period that has just
  begun is passed over, and the line names the period judged) lies below the reference
  (the periods before it pooled, or the site's last ``batchscan evaluate``) by more than
  chance allows: the upper end of the 95 % interval of the difference is below zero. A
  period with fewer studies of either class never warns: small is not bad;
* :func:`disagreement_warning`: a second ``WARNING: performance`` line when the share of
  labelled studies whose flag differs from the report label lay above the baseline's 95 %
  band in :data:`DISAGREEMENT_RUN` consecutive periods (the Mayo Clinic team's rule, Sorin
  et al., JACR 2025); the AUC needs both classes and waits for a whole period, this counts
  disagreements and so reacts to a shift in prevalence or calibration as well;
* :func:`discrepancies`: the studies a quality officer reviews first, flagged while the
  report says normal, and reported pneumonia while scored below the threshold.

What a figure here is worth: report labels are noisy (a report may hedge, the labeler may
err; docs/site/labels.md, "What a report-derived label is worth"), the scores are those
of the model in use now on every period (a new model is scored on the whole archive from
the input store, so the trend shows that model, not the history of models), and an AUC
mixes views: a period with more AP films (sicker patients) may differ for that reason
alone.

This stage reads the state's study rows and the reports file; it writes nothing itself
(the scan writes the frames it returns, :mod:`batchscan.results.report`), and knows nothing of
scoring.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from batchscan.results.report import DISCREPANCIES_SCHEMA, PERFORMANCE_SCHEMA
from batchscan.site import metrics
from batchscan.site.label_cache import LabelCache
from batchscan.site.report_labels import Report, ReportLabeler, ReportsError, read_reports

PERIODS: Final = ("day", "week", "month")
#: Studies of each class the latest period needs before it may warn.
MIN_PER_CLASS: Final = 10
#: Studies of each class the earlier periods need to be the reference.
MIN_REFERENCE_PER_CLASS: Final = 20
#: The disagreement alarm, after the Mayo Clinic team's (Sorin et al., JACR 2025: daily
#: disagreement of a deployed detector with the report labels above a 95 % band for 7
#: consecutive days): a period counts against the model when the share of its labelled
#: studies whose flag differs from the report label lies above the upper edge of the
#: baseline's central :data:`DISAGREEMENT_BAND` band, and :data:`DISAGREEMENT_RUN` such
#: periods in a row alarm.
DISAGREEMENT_RUN: Final = 7
DISAGREEMENT_BAND: Final = 0.95
#: Labelled studies a period needs to count in a run (a smaller one is passed over: it
#: neither breaks a run nor extends it).
MIN_DISAGREEMENT_STUDIES: Final = 20
#: The reference of the disagreement alarm and of the drift monitor
#: (:mod:`batchscan.site.drift`), by period: the first this many periods with enough
#: studies. Four weeks or four months; for days four weeks of them, so that a site's weekly
#: rhythm (fewer studies and more bedside films at the weekend) is inside the reference,
#: with four of each day of the week (the drift monitor compares a day with the reference's
#: days of its weekday).
REFERENCE_PERIODS: Final = {"day": 28, "week": 4, "month": 4}
#: Bootstrap resamples of the intervals.
RESAMPLES: Final = 1000
#: Files of a reports folder that are read (RIS exports), in name order.
REPORT_SUFFIXES: Final = (".csv", ".jsonl", ".ndjson")

#: The columns of performance.parquet and discrepancies.parquet (their schemas are the
#: report stage's, :mod:`batchscan.results.report`).
PERFORMANCE_COLUMNS: Final = tuple(PERFORMANCE_SCHEMA.names)
DISCREPANCY_COLUMNS: Final = tuple(DISCREPANCIES_SCHEMA.names)
FLAGGED_NORMAL: Final = "flagged_reported_normal"
MISSED_PNEUMONIA: Final = "reported_pneumonia_scored_low"


class MonitorError(ValueError):
    """A reports file that cannot be used (one line naming the file and line)."""


def report_files(path: Path) -> list[Path]:
    """The RIS exports of `path`: the file itself, or a folder's ``.csv``/``.jsonl`` files
    in name order (a later file's report of an accession replaces an earlier one's).

    Raises
    ------
    MonitorError
        If `path` is neither a file nor a folder holding such files.
    """
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in REPORT_SUFFIXES
        )
        if found:
            return found
        raise MonitorError(f"reports folder {path} holds no {'/'.join(REPORT_SUFFIXES)} file")
    raise MonitorError(f"reports file not found: {path}")


def read_all(path: Path) -> list[Report]:
    """Every report of the file or folder `path`, the last one of each accession kept.

    Raises
    ------
    MonitorError
        A file that cannot be read or has a bad row (the message names file and line).
    """
    latest: dict[str, Report] = {}
    for file in report_files(path):
        try:
            reports = read_reports(file)
        except ReportsError as exc:
            raise MonitorError(str(exc)) from None
        for report in reports:
            latest[report.key] = report
    return list(latest.values())


def joined(studies: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """The scored studies whose accession has a ``pneumonia`` or ``normal`` label, with
    ``label`` (1 or 0) and ``report_label`` (uncertain reports are left out)."""
    report_label = studies["accession_number"].map(labels)
    decided = report_label.isin(("pneumonia", "normal"))
    out = studies[decided].copy()
    out["report_label"] = report_label[decided]
    out["label"] = (out["report_label"] == "pneumonia").astype(int)
    return out


def period_starts(study_dates: pd.Series, period: str) -> pd.Series:
    """The first day of each study date's day, ISO week (Monday) or month; NaT when
    undated (the one period logic of the performance and drift monitors)."""
    days = pd.to_datetime(study_dates, errors="coerce")
    if period == "day":
        starts = days
    elif period == "week":
        starts = days - pd.to_timedelta(days.dt.day_of_week, unit="D")
    else:
        starts = days.dt.to_period("M").dt.start_time
    return starts.dt.normalize()


def reference_rows(
    study_dates: pd.Series,
    starts: pd.Series,
    period: str,
    enough: Callable[[pd.Series], bool],
    pinned: tuple[date, date] | None = None,
) -> pd.Series:
    """Which rows make the reference: those dated ``FROM..TO`` (inclusive) when `pinned`,
    else those of the first :data:`REFERENCE_PERIODS` periods of `period` whose rows pass
    `enough` (a mask of one period's rows -> whether they are enough), in date order. The
    disagreement alarm and the drift monitor (:mod:`batchscan.site.drift`) share it."""
    if pinned is not None:
        days = pd.to_datetime(study_dates, errors="coerce")
        return (days >= pd.Timestamp(pinned[0])) & (days <= pd.Timestamp(pinned[1]))
    chosen: list[Any] = []
    for start in sorted(starts.dropna().unique()):
        if len(chosen) == REFERENCE_PERIODS[period]:
            break
        if enough(starts == start):
            chosen.append(start)
    return starts.isin(chosen)


def disagreement(
    frame: pd.DataFrame,
    period: str,
    threshold: float,
    reference: tuple[date, date] | None = None,
) -> pd.DataFrame:
    """Per period of :func:`joined` studies: ``period_start``, ``n`` labelled studies, the
    ``disagreement`` (share whose flag, ``score >= threshold``, differs from the report
    label), the upper edge of the baseline's band at this ``n`` (``band``), whether the
    period lies ``above`` it and whether it is part of the ``reference``.

    The baseline is the disagreement of the reference studies pooled
    (:func:`reference_rows`: the first :data:`REFERENCE_PERIODS` periods with
    :data:`MIN_DISAGREEMENT_STUDIES` labelled studies, or `reference` pinned); the band is
    the central :data:`DISAGREEMENT_BAND` interval of a period's share of `n` studies, its
    own binomial noise and the baseline's together (normal approximation, so that a period
    of few studies needs a larger share to lie above it).
    """
    columns = ["period_start", "n", "disagreement", "band", "above", "reference"]
    starts = period_starts(frame["study_date"], period)
    dated = starts.notna()
    if not dated.any():
        return pd.DataFrame(columns=columns)
    wrong = (frame["score"].to_numpy(dtype=np.float64) >= threshold) != (
        frame["label"].to_numpy(dtype=int) == 1
    )
    base = reference_rows(
        frame["study_date"],
        starts,
        period,
        lambda rows: int(rows.sum()) >= MIN_DISAGREEMENT_STUDIES,
        reference,
    ).to_numpy(dtype=bool)
    n0 = int(base.sum())
    p0 = float(wrong[base].mean()) if n0 else float("nan")
    z = metrics.NORMAL.inv_cdf(0.5 + DISAGREEMENT_BAND / 2.0)
    rows = []
    for start, index in pd.Series(np.arange(len(frame)))[dated.to_numpy()].groupby(
        starts[dated].to_numpy(), sort=True
    ):
        part = index.to_numpy()
        n, share = len(part), float(wrong[part].mean())
        band = float("nan")
        if n0:  # a baseline of no disagreement at all is taken as half a study of it
            p = min(max(p0, 0.5 / n0), 1.0 - 0.5 / n0)
            band = p0 + z * np.sqrt(p * (1.0 - p) * (1.0 / n + 1.0 / n0))
        rows.append(
            {
                "period_start": pd.Timestamp(start).date(),
                "n": n,
                "disagreement": share,
                "band": float(band),
                "above": bool(n0 and share > band),
                "reference": bool(base[part].any()),
            }
        )
    return pd.DataFrame(rows, columns=columns)


def disagreement_warning(table: pd.DataFrame, period: str) -> str | None:
    """The ``WARNING: performance`` line of the disagreement alarm, or None: the most recent
    :data:`DISAGREEMENT_RUN` periods with :data:`MIN_DISAGREEMENT_STUDIES` labelled studies
    (reference periods aside) all lie above the baseline's band."""
    counted = table[(table["n"] >= MIN_DISAGREEMENT_STUDIES) & ~table["reference"]]
    run = counted.tail(DISAGREEMENT_RUN)
    if len(run) < DISAGREEMENT_RUN or not run["above"].all():
        return None
    last = run.iloc[-1]
    return (
        f"WARNING: performance: the model's flags disagreed with the report labels above the "
        f"baseline's {DISAGREEMENT_BAND:.0%} band in {DISAGREEMENT_RUN} consecutive {period}s "
        f"with {MIN_DISAGREEMENT_STUDIES} or more labelled studies, from "
        f"{run.iloc[0]['period_start']} to {last['period_start']} (the last: "
        f"{last['disagreement']:.1%} of {int(last['n'])} labelled studies, band up to "
        f"{last['band']:.1%}); see performance.csv and report.html"
    )


def _auc_interval(y: np.ndarray, s: np.ndarray, seed: int) -> tuple[float, float] | None:
    return metrics.paired_bootstrap(
        y, lambda i: metrics.roc_auc(y[i], s[i]), resamples=RESAMPLES, seed=seed
    )


def performance(
    frame: pd.DataFrame,
    period: str,
    threshold: float,
    model_version: str,
    reference: tuple[date, date] | None = None,
) -> pd.DataFrame:
    """One row per period with labelled studies (columns :data:`PERFORMANCE_COLUMNS`), with
    the :func:`disagreement` of each and its baseline band.

    Parameters
    ----------
    frame:
        :func:`joined` studies (``study_date``, ``score``, ``label``).
    period:
        ``day``, ``week`` or ``month``.
    reference:
        The disagreement's baseline pinned to studies dated FROM..TO, or None (the first
        :data:`REFERENCE_PERIODS` periods with enough labelled studies).
    """
    starts = period_starts(frame["study_date"], period)
    rows = []
    for start, part in frame.groupby(starts[starts.notna()], sort=True):
        y = part["label"].to_numpy(dtype=int)
        s = part["score"].to_numpy(dtype=np.float64)
        both = bool(y.any() and (y == 0).any())
        interval = _auc_interval(y, s, seed=int(start.toordinal())) if both else None
        flagged = s >= threshold
        rows.append(
            {
                "period_start": start.date(),
                "n_labelled": len(y),
                "n_pneumonia": int(y.sum()),
                "auc": metrics.roc_auc(y, s) if both else None,
                "auc_low": interval[0] if interval else None,
                "auc_high": interval[1] if interval else None,
                "sensitivity": float(flagged[y == 1].mean()) if y.any() else None,
                "specificity": float((~flagged[y == 0]).mean()) if (y == 0).any() else None,
                "model_version": model_version,
            }
        )
    out = pd.DataFrame(rows, columns=list(PERFORMANCE_COLUMNS))
    if len(out):
        table = disagreement(frame, period, threshold, reference).set_index("period_start")
        out["disagreement"] = out["period_start"].map(table["disagreement"])
        out["disagreement_band"] = out["period_start"].map(table["band"])
    return out


def latest_full_period(starts: pd.Series, enough: Callable[[pd.Series], bool]) -> Any:
    """The start of the most recent period whose rows pass `enough` (a mask of the rows of
    one period -> whether they are enough to judge it), or None when no period does.

    Why not simply the newest period: a period that has just begun holds a handful of
    studies, and judging it alone would silence every alarm until it fills up (found on a
    check: April's reports shuffled, its studies running to 3 May, no warning).
    """
    for start in sorted(starts.dropna().unique(), reverse=True):
        if enough(starts == start):
            return pd.Timestamp(start)
    return None


def performance_warning(
    frame: pd.DataFrame, period: str, reference_auc: float | None = None
) -> str | None:
    """The ``WARNING: performance`` line, or None (see the module's description).

    The period judged is the most recent one with :data:`MIN_PER_CLASS` studies of each
    class (:func:`latest_full_period`), and the line names it; the reference is the periods
    before it. `reference_auc` (the last ``batchscan evaluate``) is the reference only when
    the earlier periods hold too few studies of a class to be one.
    """
    starts = period_starts(frame["study_date"], period)
    labels = frame["label"].to_numpy(dtype=int)

    def enough(rows: pd.Series) -> bool:
        y = labels[rows.to_numpy()]
        return min(int(y.sum()), int((y == 0).sum())) >= MIN_PER_CLASS

    judged = latest_full_period(starts, enough)
    if judged is None:
        return None
    latest, earlier = frame[starts == judged], frame[starts < judged]
    y1 = latest["label"].to_numpy(dtype=int)
    s1 = latest["score"].to_numpy(dtype=np.float64)
    auc = metrics.roc_auc(y1, s1)
    y0 = earlier["label"].to_numpy(dtype=int)
    s0 = earlier["score"].to_numpy(dtype=np.float64)
    if min(int(y0.sum()), int((y0 == 0).sum())) >= MIN_REFERENCE_PER_CLASS:
        reference = metrics.roc_auc(y0, s0)
        source = f"the earlier periods ({len(y0)} labelled studies)"
        interval = metrics.unpaired_auc_difference_interval(y1, s1, y0, s0, resamples=RESAMPLES)
    elif reference_auc is not None:
        reference = float(reference_auc)
        source = "the site's last batchscan evaluate"
        own = _auc_interval(y1, s1, seed=0)
        interval = None if own is None else (own[0] - reference, own[1] - reference)
    else:
        return None
    if interval is None or interval[1] >= 0:
        return None
    newest = starts.max()
    after = (
        ""
        if judged == newest
        else f" (the most recent {period} with {MIN_PER_CLASS} studies of each class; the "
        f"{period} from {newest.date()} holds fewer)"
    )
    return (
        f"WARNING: performance: the {period} from {judged.date()}{after} has AUC {auc:.3f} on "
        f"{len(y1)} labelled studies ({int(y1.sum())} pneumonia), below the reference AUC "
        f"{reference:.3f} of {source} by more than chance allows (difference "
        f"{auc - reference:+.3f}, 95 % CI {interval[0]:+.3f} to {interval[1]:+.3f}); see "
        "performance.csv and report.html"
    )


def discrepancies(frame: pd.DataFrame, labels_reason: dict[str, str] | None = None) -> pd.DataFrame:
    """Studies the model and the report disagree on (columns :data:`DISCREPANCY_COLUMNS`):
    flagged but reported normal, highest score first; then reported pneumonia but scored
    below the threshold, lowest score first (the clearest disagreements lead each list)."""
    flagged = frame["flag"].astype(bool)
    normal, pneumonia = frame["label"] == 0, frame["label"] == 1
    first = (
        frame[flagged & normal]
        .sort_values("score", ascending=False)
        .assign(discrepancy=FLAGGED_NORMAL)
    )
    second = (
        frame[~flagged & pneumonia]
        .sort_values("score", ascending=True)
        .assign(discrepancy=MISSED_PNEUMONIA)
    )
    out = pd.concat([first, second], ignore_index=True)
    out["report_reason"] = out["accession_number"].map(labels_reason or {})
    return out.reindex(columns=list(DISCREPANCY_COLUMNS))


@dataclass(slots=True)
class Monitored:
    """What one monitoring pass gives the scan: the frames to write, the warning line, or
    the one-line error of a bad reports file (then nothing is to be written)."""

    performance: pd.DataFrame | None = None
    discrepancies: pd.DataFrame | None = None
    warning: str | None = None
    error: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    disagreement_warning: str | None = None

    @property
    def warnings(self) -> tuple[str, ...]:
        """The ``WARNING: performance`` lines to print: the AUC alarm's, the disagreement
        alarm's."""
        return tuple(w for w in (self.warning, self.disagreement_warning) if w)


def monitor(
    reports_path: Path,
    cache_path: Path,
    studies: Iterable[tuple[Any, ...]],
    *,
    period: str,
    threshold: float,
    model_version: str,
    reference_auc: float | None = None,
    labeler: Callable[[], ReportLabeler] = ReportLabeler,
    reference: tuple[date, date] | None = None,
) -> Monitored:
    """Label what is new in `reports_path`, join to `studies` (rows of study UID,
    accession, study date, score, flag) and measure. `reference` pins the disagreement
    alarm's baseline to studies dated FROM..TO (``--drift-reference``, shared with the
    drift monitor).

    A reports file with a bad row gives ``error`` (naming file and line) and no frames:
    the last good monitoring files stay as they are.
    """
    try:
        reports = read_all(reports_path)
    except MonitorError as exc:
        return Monitored(error=str(exc))
    cache = LabelCache(cache_path)
    try:
        refreshed = cache.refresh(reports, labeler)
    finally:
        cache.close()
    frame = pd.DataFrame(
        list(studies),
        columns=["study_instance_uid", "accession_number", "study_date", "score", "flag"],
    )
    frame["flag"] = frame["flag"].astype(bool)  # SQLite keeps 0/1
    frame["model_version"] = model_version
    labelled = joined(frame, refreshed.labels)
    rows = performance(labelled, period, threshold, model_version, reference)
    facts = {
        "reports_file": str(reports_path),
        "period": period,
        "reports": refreshed.reports,
        "reports_labelled_this_run": refreshed.labelled,
        "reports_unchanged": refreshed.unchanged,
        "labels_known": len(refreshed.labels),
        "studies_labelled": len(labelled),
        "periods": len(rows),
    }
    return Monitored(
        performance=rows,
        discrepancies=discrepancies(labelled, refreshed.reasons),
        warning=performance_warning(labelled, period, reference_auc),
        facts=facts,
        disagreement_warning=disagreement_warning(
            disagreement(labelled, period, threshold, reference), period
        ),
    )
