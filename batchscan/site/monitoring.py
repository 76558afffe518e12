"""Monitoring against the radiologists' reports: how the model does, period by period, on
the studies the site's radiologists have reported, and which studies they disagree on.

Why here: a hospital gets a radiology report for every study, every day, and batchscan can
already turn reports into labels (:mod:`batchscan.site.report_labels`). So each scan with
``--reports-file`` labels the reports that are new or changed since the last run (a
report is known by its accession number and a digest of its text, in
``REPORT_DIR/report_labels.sqlite``, :mod:`batchscan.site.label_cache`; the text itself is
never kept), joins the labels to the studies the state holds, and measures:

* :func:`performance`: one row per ISO week (starting Monday) or calendar month of study
  date: studies labelled, pneumonia among them, the AUC with its 95 % bootstrap interval,
  sensitivity and specificity at the model's threshold;
* :func:`performance_warning`: a ``WARNING: performance`` line when the latest period's
  AUC lies below the reference (the earlier periods pooled, or the site's last
  ``batchscan evaluate``) by more than chance allows: the upper end of the 95 % interval of
  the difference is below zero. A period with fewer than :data:`MIN_PER_CLASS` studies of
  either class never warns: small is not bad;
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
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from batchscan.results.report import DISCREPANCIES_SCHEMA, PERFORMANCE_SCHEMA
from batchscan.site import metrics
from batchscan.site.label_cache import LabelCache
from batchscan.site.report_labels import Report, ReportLabeler, ReportsError, read_reports

PERIODS: Final = ("week", "month")
#: Studies of each class the latest period needs before it may warn.
MIN_PER_CLASS: Final = 10
#: Studies of each class the earlier periods need to be the reference.
MIN_REFERENCE_PER_CLASS: Final = 20
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
    """The first day of each study date's ISO week (Monday) or month; NaT when undated."""
    days = pd.to_datetime(study_dates, errors="coerce")
    if period == "week":
        starts = days - pd.to_timedelta(days.dt.day_of_week, unit="D")
    else:
        starts = days.dt.to_period("M").dt.start_time
    return starts.dt.normalize()


def _auc_interval(y: np.ndarray, s: np.ndarray, seed: int) -> tuple[float, float] | None:
    return metrics.paired_bootstrap(
        y, lambda i: metrics.roc_auc(y[i], s[i]), resamples=RESAMPLES, seed=seed
    )


def performance(
    frame: pd.DataFrame, period: str, threshold: float, model_version: str
) -> pd.DataFrame:
    """One row per period with labelled studies (columns :data:`PERFORMANCE_COLUMNS`).

    Parameters
    ----------
    frame:
        :func:`joined` studies (``study_date``, ``score``, ``label``).
    period:
        ``week`` or ``month``.
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
    return pd.DataFrame(rows, columns=list(PERFORMANCE_COLUMNS))


def performance_warning(
    frame: pd.DataFrame, period: str, reference_auc: float | None = None
) -> str | None:
    """The ``WARNING: performance`` line, or None (see the module's description).

    `reference_auc` (the last ``batchscan evaluate``) is the reference only when the earlier
    periods hold too few studies of a class to be one.
    """
    starts = period_starts(frame["study_date"], period)
    if starts.notna().sum() == 0:
        return None
    last = starts.max()
    latest, earlier = frame[starts == last], frame[starts < last]
    y1 = latest["label"].to_numpy(dtype=int)
    s1 = latest["score"].to_numpy(dtype=np.float64)
    if min(int(y1.sum()), int((y1 == 0).sum())) < MIN_PER_CLASS:
        return None
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
    return (
        f"WARNING: performance: the {period} from {last.date()} has AUC {auc:.3f} on "
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
) -> Monitored:
    """Label what is new in `reports_path`, join to `studies` (rows of study UID,
    accession, study date, score, flag) and measure.

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
    rows = performance(labelled, period, threshold, model_version)
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
    )
