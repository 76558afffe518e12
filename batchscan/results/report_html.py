"""``report.html``: what a run found, for the people who look rather than read tables.

Written at the end of every run beside the Parquet reports (and atomically, like them), and
again on demand by ``batchscan report REPORT_DIR``, from the incremental state alone. One
self-contained file (inline SVG charts and PNG thumbnails, no script, no outside URL), so it
opens from a file share on a workstation with no network.

It must stay fast and small on a state of ten million files, so:

* every figure is an aggregate computed in SQL by the state database (counts by bin, by
  week, by device; asked of :class:`~batchscan.results.state.StateStore` by what it
  means), never a table loaded into Python; accounting comes from the manifest, which the
  run has just counted;
* images are shown only for a bounded few (the top flagged studies, a random quality-control
  sample found by one early-stopping pass), and their pictures are made again from the
  archive (or fetched again from the PACS that was scanned) at the end, through the scan's
  own stages (:func:`batchscan.engines.pipeline.model_input`):
  the 64 x 64 model input, at model-input size, where no burned-in text is legible;
* the images of the top flagged studies also get a map of where their score came from
  (:mod:`batchscan.results.saliency`), drawn over the display picture at 256 px. Only those pay for
  it, and once: the figures are kept in ``report_figures.json`` beside the page, keyed by
  file, size, mtime, model and decode settings, so a nightly run with nothing new neither
  decodes them again nor loads the model (TensorFlow) to draw them.

No patient name, ID, birth date or free text is shown: the same columns as the reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from batchscan.engines.pipeline import model_input
from batchscan.ingest.paths import from_state, readable
from batchscan.results import plots
from batchscan.results.report import period_label
from batchscan.results.saliency import (
    Explainer,
    explain_file,
    input_picture,
    run_explainer,
    shown_options,
)
from batchscan.results.state import StateStore
from batchscan.storage import files

REPORT_FILE: Final = "report.html"
#: The explained figures of the last page, reused while their files and model are the same.
FIGURES_FILE: Final = "report_figures.json"
#: Score bins of the histograms.
BINS: Final = 20
#: Flagged studies shown with their pictures, and images per study at most.
TOP_STUDIES: Final = 12
IMAGES_PER_STUDY: Final = 3
#: Images of the random quality-control sheet.
SAMPLE_IMAGES: Final = 24
#: Devices and model versions drawn (the most frequent), weeks and runs shown.
TOP_GROUPS: Final = 8
WEEKS: Final = 52
RUNS: Final = 30
#: Discrepancies listed on the page (all are in discrepancies.csv).
TOP_DISCREPANCIES: Final = 25
#: Drift periods drawn (the most recent) and alarms listed, the newest first (all are in
#: drift.csv).
DRIFT_PERIODS: Final = 90
TOP_ALARMS: Final = 25
DRIFT_TITLE: Final = "Drift of the films against the reference (no reports needed)"


@dataclass(frozen=True, slots=True)
class ReportInputs:
    """What the page is made from besides the state.

    Attributes
    ----------
    out_dir:
        REPORT_DIR.
    manifest:
        The latest run's manifest (counts, arguments, model).
    card:
        The model card, or None when the model file is no longer where the run found it.
    archive:
        The archive folder, to make the thumbnails again; None shows none.
    explainer:
        Makes the :class:`batchscan.results.saliency.Explainer` of the run's model, called at most
        once and only when a figure is not in the cache (the scan hands over the model it
        has loaded); None draws no maps.
    performance, discrepancies:
        The monitoring frames of this run (:mod:`batchscan.site.monitoring`); None reads the
        last ones published in REPORT_DIR, if any.
    drift:
        The drift monitor's frame of this run (:mod:`batchscan.site.drift`); None reads the
        last one published in REPORT_DIR, if any.
    stored_input:
        The model input of a file (by its stored path) from the input store, or None when
        the store does not hold it; the quality-control thumbnails come from there rather
        than from the archive. None reads every thumbnail from the archive.
    fetched:
        For a PACS scan (no `archive`): the bytes of an instance by its stored path,
        fetched again (raising when it cannot be), for the top flagged studies' maps and a
        thumbnail the store lacks. None: no fetching (``batchscan report`` of a PACS scan
        shows the maps it kept and the stored inputs).
    identity:
        The (size, mtime) the state holds for a stored path: what the kept figures of a
        PACS's instances are keyed by.
    """

    out_dir: Path
    manifest: dict[str, Any]
    card: dict[str, Any] | None
    archive: Path | None
    explainer: Callable[[], Explainer | None] | None = None
    performance: pd.DataFrame | None = None
    discrepancies: pd.DataFrame | None = None
    stored_input: Callable[[Any], np.ndarray | None] | None = None
    fetched: Callable[[Any], bytes] | None = None
    identity: Callable[[Any], tuple[int, int] | None] | None = None
    drift: pd.DataFrame | None = None


def _figure(inputs: ReportInputs, stored_path: Any, caption: str) -> str:
    """One thumbnail with its caption; a plain caption when the picture cannot be made."""
    thumbnail = None
    stored = inputs.stored_input(stored_path) if inputs.stored_input is not None else None
    if stored is not None:
        thumbnail = input_picture(stored)
    elif inputs.archive is not None or inputs.fetched is not None:
        try:
            options = shown_options(inputs.manifest)
            if inputs.fetched is not None:  # a PACS's instance
                path = from_state(stored_path)
                tensor = model_input(path, options, inputs.fetched(path))
            else:
                assert inputs.archive is not None
                tensor = model_input(
                    os.path.join(os.fspath(inputs.archive), from_state(stored_path)), options
                )
            thumbnail = input_picture(tensor)
        except Exception:  # moved, changed or gone since the scan: the page goes on
            pass
    return plots.figure(caption, thumbnail)


@dataclass(slots=True)
class _Figures:
    """The explained figures of one page: made once per file and model, kept between pages
    in :data:`FIGURES_FILE`."""

    inputs: ReportInputs
    cached: dict[str, list[str | None]]
    used: dict[str, list[str | None]] = field(default_factory=dict)
    _explainer: Any = None
    _asked: bool = False

    @classmethod
    def load(cls, inputs: ReportInputs) -> _Figures:
        try:
            cached = json.loads((inputs.out_dir / FIGURES_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cached = {}
        return cls(inputs, cached if isinstance(cached, dict) else {})

    def explainer(self) -> Explainer | None:
        if not self._asked:
            self._asked = True
            try:
                factory = self.inputs.explainer
                self._explainer = factory() if factory is not None else None
            except Exception:  # no model to explain with: the pictures without maps
                self._explainer = None
        return self._explainer

    def figure(self, stored_path: Any, caption: str) -> str:
        """The map over the display picture and the model input of one image, with its
        caption; the model input alone, or a plain caption, when that is all there is."""
        inputs = self.inputs
        if inputs.archive is not None:
            path = os.path.join(os.fspath(inputs.archive), from_state(stored_path))
            try:
                info = os.stat(path)
            except OSError:
                return _figure(inputs, stored_path, caption)
            identity: tuple[int, int] | None = (info.st_size, info.st_mtime_ns)
        else:  # a PACS's instance, as the state knows it (fetched only when not kept)
            path = from_state(stored_path)
            identity = inputs.identity(stored_path) if inputs.identity is not None else None
        if identity is None:
            return _figure(inputs, stored_path, caption)
        arguments = inputs.manifest.get("arguments", {})
        key = hashlib.sha256(
            json.dumps(
                [
                    readable(str(stored_path)),
                    *identity,
                    inputs.manifest.get("model", {}).get("version"),
                    arguments.get("min_edge"),
                    arguments.get("max_pixel_bytes"),
                ]
            ).encode()
        ).hexdigest()
        entry = self.cached.get(key)
        if entry is None or (entry[0] is None and inputs.explainer is not None):
            if inputs.archive is None and inputs.fetched is None:
                return _figure(inputs, stored_path, caption)
            try:
                content = inputs.fetched(path) if inputs.fetched is not None else None
                made = explain_file(path, shown_options(inputs.manifest), self.explainer(), content)
            except Exception:  # moved, changed or gone since the scan: the page goes on
                return _figure(inputs, stored_path, caption)
            entry = [made.overlay, made.model_input]
        self.used[key] = entry
        return plots.figure(caption, entry[1], entry[0])

    def save(self) -> None:
        """Keep the figures of this page (only those) for the next one, atomically."""
        with contextlib.suppress(OSError):  # a cache: the page does not depend on it
            files.write(self.inputs.out_dir / FIGURES_FILE, json.dumps(self.used))


def _histograms(state: StateStore, column: str) -> dict[str, list[int]]:
    counts: dict[str, list[int]] = defaultdict(lambda: [0] * BINS)
    for value, bin_, n in state.study_score_bins(column, BINS):
        name = {None: "unknown", 0: "false", 1: "true"}.get(value, str(value))
        counts[name][int(bin_)] += int(n)
    return dict(sorted(counts.items()))


def _top_groups(state: StateStore, by: str) -> tuple[list[list[object]], dict]:
    """Per group (device, model version): n, mean score, flagged share, histogram; the
    most frequent :data:`TOP_GROUPS` only."""
    totals, binned = state.study_groups(by, TOP_GROUPS, BINS)
    counts: dict[str, list[int]] = {str(g.group): [0] * BINS for g in totals}
    for name, bin_, n in binned:
        counts[str(name)][int(bin_)] += int(n)
    rows = [[str(g), int(n), float(mean), float(flagged)] for g, n, mean, flagged in totals]
    return rows, counts


def _section_runs(state: StateStore) -> str:
    runs = state.recent_runs(RUNS)
    history = plots.table(
        [
            "run",
            "started",
            "outcome",
            "files",
            "read",
            "scored",
            "skipped",
            "failed",
            "studies",
            "flagged",
            "images/s",
            "seconds",
            "model",
        ],
        runs,
    )
    done = [r for r in reversed(runs) if r.outcome == "ok" and r.studies]
    chart = ""
    if len(done) > 1:
        series: dict[str, list[float | None]] = defaultdict(lambda: [None] * len(done))
        for i, run in enumerate(done):
            series[str(run.model_version)][i] = run.studies_flagged / run.studies
        chart = plots.lines_svg(
            [str(r.started) for r in done],
            series,
            "Share of studies flagged after each run, by model version",
            "flagged share",
        )
    return (
        f"<h2>Run history</h2><div class='small'>{history}</div>"
        f"<p class='note'>The last {RUNS} runs at most, newest first (times UTC).</p>"
        f"<div class='charts'>{chart}</div>"
    )


def _section_accounting(manifest: dict[str, Any]) -> str:
    status = manifest["counts_by_status"]
    reasons = sorted(manifest["counts_by_reason"].items(), key=lambda kv: (-kv[1], kv[0]))
    shown = reasons[:30]
    rest = sum(n for _, n in reasons[30:])
    rows = [[reason, n] for reason, n in shown] + ([["(other reasons)", rest]] if rest else [])
    return (
        "<h2>Accounting: every file found</h2>"
        + plots.table(["status", "files"], [[k, v] for k, v in status.items()])
        + plots.table(["reason (skipped or failed)", "files"], rows)
        + "<p class='note'>Every reason is explained, with what to do, in the documentation's "
        "troubleshooting page (docs/troubleshooting.md).</p>"
    )


def _section_scores(state: StateStore, threshold: float) -> str:
    edges = np.linspace(0.0, 1.0, BINS + 1)
    charts = [
        plots.binned_svg(
            _histograms(state, "in_domain"), edges, threshold, "Study scores by in_domain"
        ),
        plots.binned_svg(
            _histograms(state, "age_group"), edges, threshold, "Study scores by age group"
        ),
    ]
    return (
        "<h2>Scores</h2><p class='note'>A score outside the model's training domain "
        "(<code>in_domain</code> false) says nothing about that patient until the model is "
        "measured on the site's own labels (<code>batchscan evaluate</code>).</p>"
        f"<div class='charts'>{''.join(charts)}</div>"
    )


def _section_weeks(state: StateStore) -> str:
    weeks = state.studies_per_week(WEEKS)
    undated = state.undated_studies()
    if not weeks:
        return f"<h2>Studies per week</h2><p>No study has a study date ({undated} undated).</p>"
    chart = plots.bars_svg(
        [str(w[0]) for w in weeks],
        {"scored": [w[1] for w in weeks], "flagged": [w[2] or 0 for w in weeks]},
        "Studies scored and flagged per week of study date (week starting Monday)",
        "studies",
    )
    return (
        f"<h2>Studies per week</h2><div class='charts'>{chart}</div>"
        f"<p class='note'>Last {WEEKS} weeks with studies at most; {undated} studies have no "
        "valid study date.</p>"
    )


def _section_groups(state: StateStore, threshold: float) -> str:
    edges = np.linspace(0.0, 1.0, BINS + 1)
    parts = ["<h2>Drift: scores by device and by model version</h2>"]
    for title, by in (("device", "device"), ("model version", "model_version")):
        rows, counts = _top_groups(state, by)
        parts.append(f"<h3>By {title}</h3>")
        parts.append(plots.table([title, "studies", "mean score", "flagged share"], rows))
        chart = plots.binned_svg(
            counts, edges, threshold, f"Study scores by {title} (share)", normalize=True
        )
        parts.append(f"<div class='charts'>{chart}</div>")
    parts.append(
        f"<p class='note'>The {TOP_GROUPS} most frequent of each. A device or model whose "
        "curve stands apart from the others scores its studies differently: look before "
        "trusting its flags.</p>"
    )
    return "".join(parts)


def _section_flagged(state: StateStore, inputs: ReportInputs, figures: _Figures) -> str:
    top = state.top_flagged_studies(TOP_STUDIES)
    if not top:
        return "<h2>Top flagged studies</h2><p>No study is flagged.</p>"
    rows = [
        [
            acc or "",
            date or "",
            score,
            views or "",
            {None: "?", 0: "no", 1: "yes"}[dom],
        ]
        for _, acc, date, score, views, dom in top
    ]
    sheet = []
    for uid, acc, *_ in top:
        for path, image_score, view, _ in state.top_scored_images(uid, IMAGES_PER_STUDY):
            caption = f"{acc or uid[-8:]} {view or ''} {image_score:.3f}"
            sheet.append(figures.figure(path, caption))
    return (
        "<h2>Top flagged studies</h2>"
        + plots.table(["accession", "study date", "score", "views", "in domain"], rows)
        + "<h3>What the model saw, and where its score came from</h3>"
        + "<p class='note'>Each image: the picture the model saw (the centre square of the "
        "display picture) with a map of the places that raised its score (HiResCAM on the "
        "last convolution layer; blue to red: more), and the 64 x 64 model input beside it. A "
        "map on a marker, a tube or the edge of the picture rather than the lungs is a reason "
        "to doubt the flag.</p>" + f"<div class='sheet maps'>{''.join(sheet)}</div>"
    )


def _section_sample(state: StateStore, inputs: ReportInputs) -> str:
    scored = int(inputs.manifest["counts_by_status"].get("scored", 0))
    every = max(1, scored // (4 * SAMPLE_IMAGES))
    picked = state.random_scored_images(every, SAMPLE_IMAGES)
    sheet = "".join(
        _figure(inputs, path, f"{acc or ''} {view or ''} {score:.3f}")
        for path, score, view, acc in picked
    )
    return (
        "<h2>Random sample for quality control</h2>"
        f"<p class='note'>{len(picked)} scored images drawn at random (a new draw every "
        "report): check that the pictures look like chest radiographs the right way up.</p>"
        f"<div class='sheet'>{sheet}</div>"
    )


def _monitoring_frame(inputs: ReportInputs, name: str) -> pd.DataFrame | None:
    given = getattr(inputs, name)
    if given is not None:
        return given
    path = inputs.out_dir / f"{name}.parquet"
    try:
        return pd.read_parquet(path) if path.is_file() else None
    except (OSError, ValueError):  # a damaged file: the page goes on without the section
        return None


def _section_monitoring(inputs: ReportInputs) -> str:
    """The model against the radiologists' reports: trends per period, and the
    discrepancies for peer review (only with ``--reports-file``)."""
    performance = _monitoring_frame(inputs, "performance")
    if performance is None:
        return ""
    monitoring = inputs.manifest.get("monitoring") or {}
    period = monitoring.get("period", "month")
    labels = [period_label(d, period) for d in pd.to_datetime(performance["period_start"]).dt.date]

    def values(column: str) -> list[float | None]:
        return [None if pd.isna(v) else float(v) for v in performance[column]]

    charts = ""
    if len(performance):
        charts = (
            plots.band_svg(
                labels,
                values("auc"),
                values("auc_low"),
                values("auc_high"),
                f"AUC against the report labels per {period}, with its 95 % CI",
                "AUC",
            )
            + plots.lines_svg(
                labels,
                {"sensitivity": values("sensitivity"), "specificity": values("specificity")},
                "Sensitivity and specificity at the model's threshold",
                "rate",
            )
            + plots.bars_svg(
                labels,
                {
                    "labelled": list(performance["n_labelled"]),
                    "pneumonia": list(performance["n_pneumonia"]),
                },
                f"Labelled studies per {period}",
                "studies",
            )
        )
    notes = []
    if monitoring.get("error"):
        notes.append(
            f"<p><b>This run's reports file could not be used</b> "
            f"({html.escape(monitoring['error'])}): the figures are those of the last good one."
            "</p>"
        )
    for key in ("warning", "disagreement_warning"):
        if monitoring.get(key):
            notes.append(f"<p><b>{html.escape(monitoring[key])}</b></p>")
    section = (
        "<h2>Performance against the radiologists' reports</h2>"
        + "".join(notes)
        + f"<div class='charts'>{charts}</div>"
        + "<p class='note'>Labels come from the reports (batchscan labels' rules; uncertain "
        "reports left out), so they carry the labeler's and the reports' noise; the scores "
        "are those of the model in use now, on every period. A period of few studies has a "
        "wide interval and never warns.</p>"
    )
    found = _monitoring_frame(inputs, "discrepancies")
    if found is None:
        return section
    rows = [
        [
            r.discrepancy.replace("_", " "),
            r.accession_number or "",
            r.study_date or "",
            r.score,
            r.report_label,
            r.report_reason or "",
        ]
        for r in found.head(TOP_DISCREPANCIES).itertuples()
    ]
    return (
        section
        + f"<h2>Discrepancies for review ({len(found)})</h2>"
        + "<p class='note'>Flagged studies whose report says normal (a possible miss, or a "
        "false alarm to learn from), highest score first; then studies reported pneumonia "
        "but scored below the threshold, lowest first. All of them are in "
        "discrepancies.csv.</p>"
        + plots.table(
            ["discrepancy", "accession", "study date", "score", "report", "report reason"], rows
        )
    )


def _section_drift(inputs: ReportInputs) -> str:
    """The films against the reference, without reports (:mod:`batchscan.site.drift`): each
    signal's statistic against its threshold per period, and what moved where one alarmed."""
    frame = _monitoring_frame(inputs, "drift")
    facts = inputs.manifest.get("drift") or {}
    if frame is None:
        return ""
    notes = []
    if facts.get("error"):
        notes.append(
            f"<p><b>The drift monitor could not run this time</b> "
            f"({html.escape(facts['error'])}): the figures are those of its last good run.</p>"
        )
    if facts.get("warning"):  # one line for cron's mail; here its parts, one a line
        head, _, moved = facts["warning"].removeprefix("WARNING: drift: ").partition(": ")
        items = "".join(
            f"<li>{html.escape(part)}</li>"
            for part in moved.split("; ")
            if not part.startswith("see ")
        )
        head = html.escape(head[:1].upper() + head[1:])  # a heading of its own here
        notes.append(f"<div class='warn'><p><b>{head}:</b></p><ul>{items}</ul></div>")
    reference = facts.get("reference")
    about = (
        "<p class='note'>Each period of study date is compared with "
        + (f"the reference ({html.escape(reference)})" if reference else "a reference")
        + " in what the scan keeps anyway: the header mix, statistics of the stored model "
        "inputs, the model's penultimate features, the scores; no archive file is opened "
        "and no report is needed. A signal is significant when its statistic passes the "
        "threshold (dashed; the shaded band above it) and alarms (red) when it stays there "
        "for the periods persistence asks for. Grey: the reference's periods.</p>"
    )
    if rhythm := facts.get("weekly_rhythm"):
        found = "; ".join(f"{day}: {', '.join(signals)}" for day, signals in rhythm.items())
        about += (
            f"<p class='note'>A weekly rhythm in the reference ({html.escape(found)}): in "
            "those signals a day of that weekday is compared with the reference's days of "
            "its weekday.</p>"
        )
    if not len(frame):
        return (
            f"<h2>{DRIFT_TITLE}</h2>"
            + "".join(notes)
            + about
            + (
                "<p>No period judged yet: the monitor needs a reference of periods with enough "
                "scored images.</p>"
            )
        )
    period = facts.get("period") or inputs.manifest["arguments"].get("monitor_period", "month")
    days = sorted(set(pd.to_datetime(frame["period_start"]).dt.date))[-DRIFT_PERIODS:]
    shown = frame[pd.to_datetime(frame["period_start"]).dt.date.isin(days)]
    labels = [period_label(d, period) for d in days]
    signals = {}
    for name, rows in shown.groupby("signal", sort=False):
        by_day = rows.set_index(pd.to_datetime(rows["period_start"]).dt.date).reindex(days)
        signals[str(name)] = {
            "statistic": [None if pd.isna(v) else v for v in by_day["statistic"]],
            "threshold": [None if pd.isna(v) else v for v in by_day["threshold"]],
            "alarm": by_day["alarm"].eq(True).tolist(),
            "reference": by_day["reference"].eq(True).tolist(),
        }
    chart = plots.signals_svg(
        labels, signals, f"Each signal against its threshold per {period} (the last {len(days)})"
    )
    alarms = frame[frame["alarm"]].sort_values(["period_start", "p_value"], ascending=[False, True])
    rows = [
        [
            period_label(pd.Timestamp(r.period_start).date(), period),
            r.signal,
            r.statistic,
            r.threshold,
            r.n,
            r.detail or "",
        ]
        for r in alarms.head(TOP_ALARMS).itertuples()
    ]
    table = (
        f"<h3>What moved where a signal alarmed ({len(alarms)} alarms)</h3>"
        + plots.table([period, "signal", "statistic", "threshold", "n", "what moved"], rows)
        if rows
        else "<p>No signal has alarmed.</p>"
    )
    return (
        f"<h2>{DRIFT_TITLE}</h2>"
        + "".join(notes)
        + about
        + f"<div class='charts'>{chart}</div>"
        + f"<div class='periods'>{table}</div>"
    )


def _section_model(inputs: ReportInputs) -> str:
    model = inputs.manifest["model"]
    card = inputs.card
    if card is None:
        return f"<h2>Model</h2><p>{html.escape(model['version'])}: card not found.</p>"
    domain = card.get("domain") or {}
    ages = domain.get("age_years")
    facts = [
        ["version", model["version"]],
        ["threshold", f"{model['threshold']:.3f}"],
        ["threshold rule", card.get("threshold_rule", "")],
        ["test AUC (held-out split of the training data)", f"{card.get('test_auc', 0.0):.3f}"],
        [
            "test sensitivity / specificity",
            f"{card.get('test_sensitivity', float('nan')):.3f}"
            f" / {card.get('test_specificity', float('nan')):.3f}",
        ],
        ["training domain: ages", f"{ages[0]}-{ages[1]} years" if ages else "not declared"],
        [
            "training domain: modalities, views",
            f"{', '.join(domain.get('modalities', []))}; {', '.join(domain.get('views', []))}",
        ],
        ["training population", domain.get("population", "")],
        ["OOD score", (card.get("ood") or {}).get("method", "none")],
    ]
    limits = "".join(f"<li>{html.escape(x)}</li>" for x in card.get("limits", []))
    return f"<h2>Model card</h2>{plots.table(['', ''], facts)}<ul>{limits}</ul>"


def render(state: StateStore, inputs: ReportInputs) -> str:
    """The whole page."""
    manifest = inputs.manifest
    threshold = float(manifest["model"]["threshold"])
    status = manifest["counts_by_status"]
    now = datetime.now(UTC).isoformat(timespec="seconds")
    summary = (
        f"<p>Run <code>{html.escape(manifest['run_id'])}</code> finished "
        f"{html.escape(str(manifest.get('finished_at')))}: {manifest['files_found']} files "
        f"({manifest['files_processed']} new or changed, {manifest['files_reused']} unchanged), "
        f"{status.get('scored', 0)} scored, {status.get('skipped', 0)} skipped, "
        f"{status.get('failed', 0)} failed; <b>{manifest.get('studies', 0)} studies, "
        f"{manifest.get('studies_flagged', 0)} flagged</b> at threshold {threshold:.3f} "
        f"({manifest.get('studies_in_domain', 0)} in the model's training domain, "
        f"{manifest.get('studies_out_of_domain', 0)} outside, "
        f"{manifest.get('studies_domain_unknown', 0)} undecided). Archive "
        f"<code>{html.escape(readable(str(manifest['arguments'].get('archive'))))}</code>. "
        f"Page made {now}.</p>"
    )
    figures = _Figures.load(inputs)
    body = (
        "<h1>batchscan report</h1>"
        + "<p class='note'>Research and triage aid, not a diagnosis: every flag needs a "
        "radiologist.</p>"
        + summary
        + _section_flagged(state, inputs, figures)
        + _section_scores(state, threshold)
        + _section_monitoring(inputs)
        + _section_drift(inputs)
        + _section_weeks(state)
        + _section_groups(state, threshold)
        + _section_accounting(manifest)
        + _section_runs(state)
        + _section_sample(state, inputs)
        + _section_model(inputs)
    )
    figures.save()
    return plots.page("batchscan report", body)


def write_report(
    state: StateStore, inputs: ReportInputs, temporary: Path | None = None
) -> tuple[Path, Path]:
    """Write the page to `temporary` (default: a hidden file beside it); returns
    (temporary, final) for the caller to publish with the run's other reports
    (:func:`batchscan.storage.files.publish`)."""
    final = inputs.out_dir / REPORT_FILE
    temporary = temporary or files.temporary_path(final, "page")
    temporary.write_text(render(state, inputs), encoding="utf-8")
    return temporary, final


class ReportError(ValueError):
    """REPORT_DIR holds no scan to report on (exit 2)."""


def regenerate(report_dir: Path) -> Path:
    """``batchscan report``: make ``report.html`` again from the state and the latest
    manifest, without scanning (with REPORT_DIR's lock held, as a run would).

    Raises
    ------
    ReportError
        No state or manifest in `report_dir`.
    batchscan.results.runlock.LockHeldError
        A run holds REPORT_DIR.
    """
    import json

    from batchscan.results.report import MANIFEST_FILE
    from batchscan.results.runlock import report_dir_lock
    from batchscan.results.state import STATE_FILE, StateError
    from batchscan.scoring.model import ModelError, check_model

    manifest_path = report_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ReportError(f"{report_dir} holds no batchscan reports (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read {manifest_path}: {exc}") from exc
    state_path = Path(manifest["arguments"].get("state") or report_dir / STATE_FILE)
    if not state_path.is_file():
        raise ReportError(f"no state database at {state_path}")
    try:
        card: dict[str, Any] | None = check_model(Path(manifest["model"]["path"])).card
    except (ModelError, OSError):
        card = None
    archive = Path(str(manifest["arguments"].get("archive")))

    inputs = ReportInputs(
        report_dir,
        manifest,
        card,
        archive if archive.is_dir() else None,
        explainer=partial(run_explainer, manifest) if card is not None else None,
    )
    with report_dir_lock(report_dir):
        try:
            state = StateStore(state_path)
        except StateError as exc:
            raise ReportError(str(exc)) from exc
        try:  # with no archive to read (a PACS, a folder gone), the figures kept show
            page = render(state, replace(inputs, identity=state.file_identity))
        finally:
            state.close()
        final = report_dir / REPORT_FILE
        files.write(final, page)
    return final
