"""``batchscan adapt``: one night from the RIS export to an audited site model.

A site that wants a model of its own has a scan's REPORT_DIR (the state, the model-input
store, the labels of its radiology reports when the scan ran with ``--reports-file``) and
one question: should the new model replace the model in use? This stage answers it the way
a temporal validation does, from that folder alone, without opening the archive:

* **earlier** studies, dated up to ``--until``, are the training period: their labelled
  studies are split by patient (stratified by label and view) into a training part and a
  validation part; early stopping, the calibration and the threshold use the validation
  part only (:func:`batchscan.site.training.train`); self-supervised pretraining
  (``--pretrain``, :mod:`batchscan.site.pretrain`) uses every scored film of the period,
  labelled or not;
* **later** studies, dated after ``--until``, are scored once, after everything is fixed,
  by the new model and by the model in use (the scan's model, on the same stored inputs):
  AUC overall, within each view and pooled within views, each with its 95 % bootstrap
  interval, the paired AUC differences, sensitivity and specificity at each model's
  threshold, the shortcut check of :mod:`batchscan.site.evaluate`, and maps of the new model's
  worst errors drawn over their model inputs. Later studies of a patient who also has a
  training-period study are left out of the measurement (the model may have learned that
  patient); without a pseudonym key the scan knows no patients, and the figures say so.

Nothing dated after ``--until`` reaches training, validation, the threshold or
pretraining (a test changes every later label and picture and gets the same weights).

The verdict (:func:`verdict`) is one line: deploy only when there are enough later studies
of each class (:data:`MIN_LATER_PER_CLASS`), the new model is better than the model in use
beyond chance overall *and* pooled within views (the lower end of each paired 95 % interval
above zero), and no header attribute carries its figure (the shortcut check's warnings).
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from batchscan.engines.pipeline import ScanConfig, prepared_stream
from batchscan.ingest.paths import from_state, stat
from batchscan.ingest.records import ImageRecord
from batchscan.results import plots
from batchscan.results.aggregate import aggregate_studies
from batchscan.results.keys import input_key
from batchscan.results.report import MANIFEST_FILE
from batchscan.results.state import STATE_FILE, StateError, scored_files
from batchscan.scoring.input_store import STORE_FILE, InputStore
from batchscan.scoring.model import (
    ModelCard,
    ModelError,
    check_model,
    check_seed_architecture,
    load_model,
)
from batchscan.site import metrics
from batchscan.site.evaluate import (
    compare_shadow,
    fmt,
    group_metrics,
    shortcut_checks,
    shortcut_html,
)
from batchscan.site.label_cache import LABELS_DB, known_labels, report_digest
from batchscan.site.monitoring import MonitorError, read_all
from batchscan.site.report_labels import ReportLabeler
from batchscan.site.site_training import (
    FINE_TUNE_EPOCHS,
    FINE_TUNE_LEARNING_RATE,
    Examples,
    TrainingError,
    balance_weights,
    split_by_patient,
)
from batchscan.storage import files

#: Studies of each class the later period needs before a verdict can say "deploy".
MIN_LATER_PER_CLASS: Final = 20
#: Share of the training period's studies (by patient) kept for validation.
VALIDATION_SHARE: Final = 0.2
#: The sensitivity whose threshold is also reported (as ``batchscan evaluate`` does).
TARGET_SENSITIVITY: Final = 0.90
#: Worst errors of each kind drawn with their maps in adaptation.html.
ERRORS_SHOWN: Final = 6
JSON_FILE: Final = "adaptation.json"
HTML_FILE: Final = "adaptation.html"
#: The columns read from the state's file rows.
_COLUMNS: Final = (
    "path",
    "size",
    "mtime_ns",
    "study_instance_uid",
    "accession_number",
    "study_date",
    "view",
    "patient_key",
    "patient_age_years",
    "age_group",
    "in_domain",
    "modality",
    "manufacturer",
    "manufacturer_model",
    "patient_sex",
    "score",
)


class AdaptError(ValueError):
    """REPORT_DIR, the reports or the options cannot give an adaptation (exit 2); the
    message says what is missing."""


@dataclass(frozen=True, slots=True)
class AdaptRequest:
    """Everything ``batchscan adapt`` was asked."""

    report_dir: Path
    until: date
    out: Path
    reports_file: Path | None = None
    name: str = "site_cnn"
    base: Path | None = None
    seed: int = 1234
    workers: int = 2
    progress: bool = False
    pretrain: bool = False
    pretrain_views: int | None = None
    epochs: int | None = None
    patience: int = 8
    #: ``view``: every view carries the same class balance in the loss and the validation
    #: AUC (:func:`batchscan.site.site_training.balance_weights`); None: class weighting.
    balance: str | None = None


@dataclass(slots=True)
class Period:
    """The labelled images of one period, with their study rows' facts (one row per
    scored image that has a model input)."""

    images: pd.DataFrame
    inputs: np.ndarray


@dataclass(slots=True)
class Adaptation:
    """What :func:`run_adaptation` gives: the result (adaptation.json), the files written,
    and the verdict line."""

    result: dict[str, Any]
    written: list[Path] = field(default_factory=list)

    @property
    def line(self) -> str:
        """The last line the command prints."""
        return self.result["verdict"]["line"]


def read_scan(report_dir: Path) -> dict[str, Any]:
    """The manifest of the last run into `report_dir`.

    Raises
    ------
    AdaptError
        No finished scan there (no state or no manifest).
    """
    manifest = report_dir / MANIFEST_FILE
    if not (report_dir / STATE_FILE).is_file() or not manifest.is_file():
        raise AdaptError(
            f"{report_dir} holds no finished batchscan scan ({STATE_FILE} and {MANIFEST_FILE})"
        )
    try:
        return json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdaptError(f"cannot read {manifest}: {exc}") from None


def site_labels(
    report_dir: Path,
    reports_file: Path | None,
    labeler: Callable[[], ReportLabeler] = ReportLabeler,
) -> tuple[dict[str, str], dict[str, Any]]:
    """``pneumonia``/``normal``/``uncertain`` by accession: the labels the scan made of its
    reports (``REPORT_DIR/report_labels.sqlite``, read-only), with the reports of
    `reports_file` that are new or changed since labelled here in memory (the scan's cache
    is left for the scan to update).

    Raises
    ------
    AdaptError
        No labels at all, or a reports file with a bad row.
    """
    known = known_labels(report_dir / LABELS_DB)
    labels = {accession: label for accession, (_, label, _) in known.items()}
    facts: dict[str, Any] = {"from_scan": len(known), "reports_file": None}
    if reports_file is not None:
        try:
            reports = read_all(reports_file)
        except MonitorError as exc:
            raise AdaptError(str(exc)) from None
        todo = [r for r in reports if known.get(r.key, ("",))[0] != report_digest(r.text)]
        if todo:
            for report, decision in zip(
                todo, labeler().label_many(r.text for r in todo), strict=True
            ):
                labels[report.key] = decision.label
        facts.update(reports_file=str(reports_file), reports=len(reports), labelled_here=len(todo))
    if not labels:
        raise AdaptError(
            f"no report labels: {report_dir} has no {LABELS_DB} (scan with --reports-file) "
            "and no --reports-file was given"
        )
    facts["labels"] = dict(Counter(labels.values()))
    return labels, facts


def scored_images(report_dir: Path, manifest: dict[str, Any]) -> pd.DataFrame:
    """The scored file rows of the scan's state (read-only), with ``input_key`` from each
    row's keys and ``date`` parsed from the study date (NaT when missing or invalid)."""
    state = Path(manifest.get("arguments", {}).get("state") or report_dir / STATE_FILE)
    try:
        frame = scored_files(state, _COLUMNS)
    except StateError as exc:
        raise AdaptError(f"cannot read the scan's state {state}: {exc}") from None
    frame["date"] = pd.to_datetime(frame["study_date"], errors="coerce").dt.normalize()
    frame["status"] = "scored"
    return frame


def _reread(
    manifest: dict[str, Any], rows: pd.DataFrame, workers: int, progress: bool
) -> dict[Any, np.ndarray]:
    """Inputs of `rows` that the store lacks, read again from the archive through the
    scan's own stages under the scan's options (only when those options still make inputs
    under the rows' input key; otherwise, and for files gone or changed, none)."""
    arguments = manifest.get("arguments", {})
    archive = Path(str(arguments.get("archive")))
    if rows.empty or not archive.is_dir():
        return {}
    config = ScanConfig(
        archive=archive,
        out=archive,  # never written: only the stage options are used
        workers=workers,
        all_modalities=bool(arguments.get("all_modalities")),
        min_edge=arguments.get("min_edge"),
        blank_gate=bool(arguments.get("blank_gate", True)),
        **(
            {"max_pixel_bytes": int(arguments["max_pixel_bytes"])}
            if arguments.get("max_pixel_bytes")
            else {}
        ),
    )
    key = input_key(config)
    wanted = rows[rows["input_key"] == key]
    records = []
    for row in wanted.itertuples():
        path = from_state(row.path)
        abs_path = f"{archive}/{path}"
        try:
            st = stat(abs_path)
        except OSError:
            continue
        if (st.st_size, st.st_mtime_ns) == (row.size, row.mtime_ns):
            records.append(
                ImageRecord(path=path, abs_path=abs_path, size=row.size, mtime_ns=row.mtime_ns)
            )
    found: dict[Any, np.ndarray] = {}
    by_path = {from_state(p): p for p in wanted["path"]}
    for batch in prepared_stream(config, iter(records), lambda n: None):
        for k, i in enumerate(batch.index.tolist()):
            found[by_path[batch.records[i].path]] = batch.inputs[k][..., 0]
    if progress:
        print(f"read {len(found)} files again that the input store lacked", flush=True)
    return found


def load_inputs(
    report_dir: Path,
    manifest: dict[str, Any],
    rows: pd.DataFrame,
    *,
    workers: int,
    progress: bool,
) -> tuple[pd.DataFrame, np.ndarray, int]:
    """The 64 x 64 inputs of `rows` (one grey channel) from the scan's input store, each
    under its own row's input key; those the store lacks are read again
    (:func:`_reread`). Returns the rows that have an input, their inputs (N, 64, 64) in
    row order, and how many files were read again."""
    found: dict[Any, np.ndarray] = {}
    store = InputStore(report_dir / STORE_FILE, readonly=True)
    try:
        for key, part in rows.groupby("input_key"):
            identities = list(
                zip(part["path"], part["size"].astype(int), part["mtime_ns"].astype(int),
                    strict=True)
            )  # fmt: skip
            for path, x in store.get(identities, str(key)).items():
                found[path] = x[..., 0]
    finally:
        store.close()
    missing = rows[~rows["path"].isin(list(found))]
    again = _reread(manifest, missing, workers, progress)
    found.update(again)
    kept = rows[rows["path"].isin(list(found))].reset_index(drop=True)
    inputs = (
        np.stack([found[p] for p in kept["path"]]).astype(np.float32)
        if len(kept)
        else np.zeros((0, 64, 64), np.float32)
    )
    return kept, inputs, len(again)


def _examples(rows: pd.DataFrame, inputs: np.ndarray) -> Examples:
    """The training period's labelled images as :class:`batchscan.site.site_training.Examples`
    (patients numbered from the scan's pseudonymised key; a study without one is its own
    patient)."""
    who = [
        key if isinstance(key, str) and key else f"study:{uid}"
        for key, uid in zip(rows["patient_key"], rows["study_instance_uid"], strict=True)
    ]
    numbers: dict[str, int] = {}
    group = np.array([numbers.setdefault(w, len(numbers)) for w in who], dtype=np.int64)
    return Examples(
        inputs=inputs,
        label=rows["label"].to_numpy(dtype=np.int64),
        group=group,
        study=rows["accession_number"].astype(str).tolist(),
        age=pd.to_numeric(rows["patient_age_years"], errors="coerce").to_numpy(np.float64),
        view=rows["view"].fillna("unknown").astype(str).tolist(),
        modality=rows["modality"].fillna("unknown").astype(str).tolist(),
        manufacturer=rows["manufacturer"].fillna("unknown").astype(str).tolist(),
        fingerprint="",
        files=len(rows),
    )


def study_frame(images: pd.DataFrame, scores: np.ndarray, threshold: float) -> pd.DataFrame:
    """One row per study of `images` scored `scores` (the scan's rule: the maximum over
    its frontal images, :func:`batchscan.results.aggregate.aggregate_studies`), with ``view`` (the
    views of its scored images, as ``batchscan evaluate`` names them) and ``label``."""
    frame = images.assign(score=scores)
    studies = aggregate_studies(frame, threshold, "")
    labels = frame.groupby("study_instance_uid")["label"].first()
    studies["view"] = studies["views"].replace("", None)  # every image here is scored
    studies["label"] = studies["study_instance_uid"].map(labels).astype(int)
    return studies


def _within_view(y: np.ndarray, s: np.ndarray, views: np.ndarray) -> dict[str, Any]:
    within, pairs = metrics.within_stratum_auc(y, s, views)
    interval = (
        metrics.paired_bootstrap(
            y, lambda i: metrics.within_stratum_auc(y[i], s[i], views[i])[0], resamples=1000
        )
        if within is not None
        else None
    )
    return {"auc": within, "auc_ci95": interval, "pairs": pairs}


def measure(
    later: pd.DataFrame,
    new_scores: np.ndarray,
    in_use: dict[str, Any],
    new: dict[str, Any],
) -> dict[str, Any]:
    """Both models on the later studies (`later` holds ``label``, ``view``, the header
    columns and the in-use study ``score``; `new_scores` the new model's study scores):
    overall, per view, pooled within views, the paired differences and the shortcut check
    of the new model."""
    y = later["label"].to_numpy(dtype=int)
    old = later["score"].to_numpy(dtype=np.float64)
    s = np.asarray(new_scores, dtype=np.float64)
    views = later["view"].fillna("unknown").astype(str).to_numpy(dtype=object)
    comparison = compare_shadow(y, old, s, in_use, new, TARGET_SENSITIVITY)
    per_view = {}
    for view in sorted(set(views.tolist())):
        mask = views == view
        per_view[view] = {
            "n": int(mask.sum()),
            "pneumonia": int(y[mask].sum()),
            **{
                role: asdict(group_metrics(y[mask], a[mask], m["threshold"], TARGET_SENSITIVITY))
                for role, a, m in (("in_use", old, in_use), ("new", s, new))
            },
        }
    within_old, within_new = _within_view(y, old, views), _within_view(y, s, views)
    both = bool(y.any() and (y == 0).any())
    within_difference = (
        metrics.paired_bootstrap(
            y,
            lambda i: _difference(y[i], old[i], s[i], views[i]),
            resamples=1000,
        )
        if both and within_old["auc"] is not None and within_new["auc"] is not None
        else None
    )
    shortcuts = shortcut_checks(later, y, s, comparison["shadow"]["auc"]) if both else None
    return {
        "n": len(y),
        "n_pneumonia": int(y.sum()),
        "comparison": comparison,
        "by_view": per_view,
        "within_views": {
            "in_use": within_old,
            "new": within_new,
            "difference": None
            if within_new["auc"] is None or within_old["auc"] is None
            else within_new["auc"] - within_old["auc"],
            "difference_ci95": within_difference,
        },
        "shortcuts": shortcuts,
    }


def _difference(y: np.ndarray, old: np.ndarray, new: np.ndarray, views: np.ndarray) -> float | None:
    a, _ = metrics.within_stratum_auc(y, old, views)
    b, _ = metrics.within_stratum_auc(y, new, views)
    return None if a is None or b is None else b - a


def verdict(measured: dict[str, Any], new_version: str) -> dict[str, Any]:
    """Deploy or not, and why (see the module's description): ``deploy`` (bool),
    ``reasons`` (what stands against it) and the one ``line`` the command ends with."""
    n_pos, n = measured["n_pneumonia"], measured["n"]
    n_neg = n - n_pos
    reasons: list[str] = []
    comparison = measured["comparison"]
    if min(n_pos, n_neg) < MIN_LATER_PER_CLASS:
        reasons.append(
            f"too few later studies to judge: {n_pos} pneumonia and {n_neg} normal after the "
            f"date; a verdict needs {MIN_LATER_PER_CLASS} of each"
        )
    else:
        interval = comparison["auc_difference_ci95"]
        if interval is None or interval[0] <= 0:
            reasons.append(
                "not better than the model in use beyond chance: AUC difference "
                f"{fmt(comparison['auc_difference'])} (95 % CI {fmt(interval)})"
            )
        within = measured["within_views"]
        w_interval = within["difference_ci95"]
        if within["difference"] is None or w_interval is None or w_interval[0] <= 0:
            reasons.append(
                "the gain does not hold within views (the view may carry the figure): "
                f"pooled within-view AUC difference {fmt(within['difference'])} "
                f"(95 % CI {fmt(w_interval)})"
            )
        for warning in (measured.get("shortcuts") or {}).get("warnings", []):
            reasons.append(f"an attribute carries the figure: {warning}")
    deploy = not reasons
    new = comparison["shadow"]
    line = (
        f"adapt: deploy {new_version}: on {n} later studies AUC {fmt(new['auc'])} against "
        f"{fmt(comparison['model_in_use']['auc'])} for the model in use, difference "
        f"{fmt(comparison['auc_difference'])} (95 % CI {fmt(comparison['auc_difference_ci95'])}); "
        f"within views {fmt(measured['within_views']['difference'])} (95 % CI "
        f"{fmt(measured['within_views']['difference_ci95'])})"
        if deploy
        else f"adapt: do not deploy {new_version}: " + "; ".join(reasons)
    )
    return {"deploy": deploy, "reasons": reasons, "line": line}


def _error_figures(
    model: Any, later_images: pd.DataFrame, inputs: np.ndarray, threshold: float
) -> dict[str, list[str]]:
    """The new model's worst errors on the later studies (normal scored highest, pneumonia
    scored lowest, by image), each drawn as its model input with its map (HiResCAM) over
    the input enlarged: no archive file is opened."""
    from batchscan.ingest.sampling import resize
    from batchscan.results.saliency import (
        PICTURE_SIZE,
        Explainer,
        data_uri,
        input_picture,
        overlay,
    )

    scores = later_images["new_score"].to_numpy(dtype=np.float64)
    y = later_images["label"].to_numpy(dtype=int)
    order = np.argsort(-scores, kind="mergesort")
    false_positives = [i for i in order if y[i] == 0 and scores[i] >= threshold][:ERRORS_SHOWN]
    false_negatives = [i for i in order[::-1] if y[i] == 1 and scores[i] < threshold][:ERRORS_SHOWN]
    chosen = false_positives + false_negatives
    if not chosen:
        return {"false_positives": [], "false_negatives": []}
    tensors = np.repeat(inputs[chosen][..., None], 3, axis=-1)
    heat = Explainer(model).maps(tensors)
    drawn = {}
    for k, i in enumerate(chosen):
        square = np.clip(resize(inputs[i], (PICTURE_SIZE, PICTURE_SIZE)), 0.0, 1.0)
        caption = (
            f"{later_images['accession_number'].iloc[i]} {later_images['view'].iloc[i] or ''} "
            f"score {scores[i]:.3f}"
        )
        drawn[i] = plots.figure(
            caption, input_picture(tensors[k]), data_uri(overlay(square, heat[k]))
        )
    return {
        "false_positives": [drawn[i] for i in false_positives],
        "false_negatives": [drawn[i] for i in false_negatives],
    }


@dataclass(frozen=True, slots=True)
class ScanInUse:
    """The scan an adaptation starts from: the manifest of its last run, the model in use
    (the scan's) and the base to fine-tune (``--base``, else the model in use)."""

    manifest: dict[str, Any]
    in_use: ModelCard
    base: ModelCard


@dataclass(slots=True)
class Selection:
    """The scan's scored images (``rows``, with ``date`` and ``report_label``) and the rows
    of each part, before any model input is read: the labelled ``earlier`` and ``later``
    images and the pretraining ``films`` (every scored image of the training period; none
    without ``--pretrain``); ``accounting`` counts what was left out and why."""

    rows: pd.DataFrame
    earlier: pd.DataFrame
    later: pd.DataFrame
    films: pd.DataFrame
    accounting: Counter[str]


@dataclass(slots=True)
class Periods:
    """The parts with their model inputs: the training period's labelled images (with their
    patient split into ``train``/``val``), the later images measured (patients seen in the
    training period left out) and the pretraining films."""

    earlier: Period
    later: Period
    films: Period
    examples: Examples
    split: np.ndarray
    accounting: Counter[str]


def open_scan(request: AdaptRequest) -> ScanInUse:
    """The scan in REPORT_DIR, its model and the base, checked before anything is read.

    Raises
    ------
    AdaptError
        No finished scan, ``--out`` inside the archive, or the scan's model unusable.
    batchscan.scoring.model.ModelError
        ``--base`` cannot be used.
    """
    manifest = read_scan(request.report_dir)
    archive = Path(str(manifest.get("arguments", {}).get("archive"))).resolve()
    out = request.out.resolve()
    if out == archive or archive in out.parents:
        raise AdaptError(f"--out {request.out} is inside the archive; it is never written")
    try:
        in_use = check_model(Path(manifest["model"]["path"]))
    except (KeyError, ModelError) as exc:
        raise AdaptError(f"the scan's model cannot be used: {exc}") from None
    base = check_model(request.base) if request.base else in_use
    return ScanInUse(manifest, in_use, base)


def select_rows(request: AdaptRequest, scan: ScanInUse, labels: dict[str, str]) -> Selection:
    """The scan's scored images with their report labels, cut at ``--until``: labelled
    images dated up to it (training), after it (measurement), and with ``--pretrain``
    every image dated up to it."""
    rows = scored_images(request.report_dir, scan.manifest)
    until = pd.Timestamp(request.until)
    rows["report_label"] = rows["accession_number"].map(labels)
    accounting: Counter[str] = Counter()
    accounting["scored images"] = len(rows)
    accounting["scored images without a study date"] = int(rows["date"].isna().sum())
    accounting["scored images without a report"] = int(rows["report_label"].isna().sum())
    accounting["scored images with an uncertain report (left out)"] = int(
        (rows["report_label"] == "uncertain").sum()
    )
    dated = rows[rows["date"].notna()]
    decided = dated["report_label"].isin(("pneumonia", "normal"))
    labelled = dated[decided].assign(label=(dated["report_label"] == "pneumonia").astype(int))
    return Selection(
        rows=rows,
        earlier=labelled[labelled["date"] <= until],
        later=labelled[labelled["date"] > until],
        films=dated[dated["date"] <= until] if request.pretrain else dated.iloc[:0],
        accounting=accounting,
    )


def load_periods(request: AdaptRequest, scan: ScanInUse, selection: Selection) -> Periods:
    """Read the selected images' model inputs (:func:`load_inputs`), split the training
    period's patients into train and val, and leave out of the measurement the later
    studies of patients the model learns from.

    Raises
    ------
    AdaptError
        Too few labelled training-period studies to split.
    """
    accounting = selection.accounting
    labelled = pd.concat([selection.earlier, selection.later])
    needed = pd.concat([labelled, selection.films]).drop_duplicates("path")
    kept, inputs, reread = load_inputs(
        request.report_dir,
        scan.manifest,
        needed.drop(columns=["label"], errors="ignore"),
        workers=request.workers,
        progress=request.progress,
    )
    accounting["files read again (not in the input store)"] = reread
    accounting["labelled images without a model input (left out)"] = int(
        (~labelled["path"].isin(kept["path"])).sum()
    )
    position = {p: i for i, p in enumerate(kept["path"])}

    def period(part: pd.DataFrame) -> Period:
        part = part[part["path"].isin(position)].reset_index(drop=True)
        return Period(part, inputs[[position[p] for p in part["path"]]])

    earlier, later = period(selection.earlier), period(selection.later)
    examples = _examples(earlier.images, earlier.inputs)
    try:
        split = split_by_patient(
            examples,
            request.seed,
            {"train": 1 - VALIDATION_SHARE, "val": VALIDATION_SHARE},
        )
    except TrainingError as exc:
        raise AdaptError(f"studies dated up to {request.until}: {exc}") from None
    # later studies of patients the model learned from are not new to it
    rows = selection.rows
    period_patients = rows.loc[rows["date"] <= pd.Timestamp(request.until), "patient_key"]
    known = {k for k in period_patients.dropna() if k}
    seen = later.images["patient_key"].isin(known).to_numpy()
    accounting["later images of patients in the training period (left out)"] = int(seen.sum())
    later = Period(later.images[~seen].reset_index(drop=True), later.inputs[~seen])
    return Periods(earlier, later, period(selection.films), examples, split, accounting)


def load_base(scan: ScanInUse) -> Any:
    """The Keras model to fine-tune (``--base``, else the model in use).

    Raises
    ------
    AdaptError
        It is not the seed architecture (which is all that ``adapt`` trains).
    """
    base = load_model(scan.base.path).keras_model
    try:
        check_seed_architecture(base)
    except ModelError as exc:
        raise AdaptError(f"{scan.base.version} cannot be fine-tuned here: {exc}") from None
    return base


def pretraining(request: AdaptRequest, base: Any, films: Period) -> Any:
    """``--pretrain``: SimSiam from `base`'s backbone on the training period's films
    (:func:`batchscan.site.pretrain.pretrain`).

    Raises
    ------
    AdaptError
        Too few films to pretrain on.
    """
    from batchscan.site.pretrain import DEFAULT_VIEWS, pretrain

    try:
        return pretrain(
            base,
            films.inputs,
            views=request.pretrain_views or DEFAULT_VIEWS,
            seed=request.seed,
            verbose=request.progress,
        )
    except ValueError as exc:
        raise AdaptError(f"--pretrain: studies dated up to {request.until}: {exc}") from None


def _as_x(inputs: np.ndarray) -> np.ndarray:
    """Model inputs (N, 64, 64) as the network takes them (N, 64, 64, 3)."""
    return np.repeat(inputs[..., None], 3, axis=-1)


def training_set(
    request: AdaptRequest, periods: Periods
) -> tuple[Any, dict[str, np.ndarray] | None]:
    """The training period's train and val parts as a
    :class:`batchscan.site.training.Dataset` (its test part: the later images, which only
    the card's figures read), and the ``--balance view`` weights (None: class weighting)."""
    from batchscan.site.training import Dataset

    split, examples = periods.split, periods.examples
    x = {s: _as_x(periods.earlier.inputs[split == s]) for s in ("train", "val")}
    y = {s: examples.label[split == s] for s in ("train", "val")}
    x["test"] = _as_x(periods.later.inputs)
    y["test"] = periods.later.images["label"].to_numpy(dtype=np.int64)
    if len(x["test"]) == 0:  # write_model scores a test split: give it the validation part
        x["test"], y["test"] = x["val"], y["val"]
    dataset = Dataset(
        x=x,
        y=y,
        name=f"{request.report_dir.name}: report-labelled studies dated up to {request.until}",
        sha256=None,
        source=str(request.report_dir),
    )
    weights = (
        {
            s: balance_weights(
                y[s], [v for v, k in zip(examples.view, split, strict=True) if k == s]
            )
            for s in ("train", "val")
        }
        if request.balance == "view"
        else None
    )
    return dataset, weights


def train_config(request: AdaptRequest) -> Any:
    """Fine-tuning as ``batchscan train`` fine-tunes, with ``--epochs`` and ``--patience``."""
    from batchscan.site.training import TrainConfig

    return TrainConfig(
        epochs=request.epochs or FINE_TUNE_EPOCHS,
        learning_rate=FINE_TUNE_LEARNING_RATE,
        patience=request.patience,
        seed=request.seed,
        verbose=1 if request.progress else 0,
    )


def write_site_model(
    request: AdaptRequest,
    scan: ScanInUse,
    periods: Periods,
    trained: tuple[Any, dict[str, Any]],
    dataset: Any,
    config: Any,
    pretrained: Any = None,
    card_facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the new model ``--out/<name>.keras`` and its card, which states the site's
    domain, the study dates learned from, the split and the base; `card_facts` replace or
    add card entries. Returns the card."""
    from batchscan.site.training import write_model

    model, report = trained
    split, examples, later = periods.split, periods.examples, periods.later
    request.out.mkdir(parents=True, exist_ok=True)
    studies_in = {
        s: len(set(np.asarray(examples.study)[split == s].tolist())) for s in ("train", "val")
    }
    dates = periods.earlier.images["date"]
    facts = {
        "intended_use": "Scores this site's frontal chest radiographs after adaptation to its "
        "report-labelled studies; deploy only on the verdict of batchscan adapt.",
        "domain": {
            "age_years": None,
            "modalities": sorted(set(examples.modality) - {"unknown"}),
            "views": sorted(set(examples.view) - {"unknown"}),
            "population": f"report-labelled studies of the site scanned into "
            f"{request.report_dir}, dated up to {request.until}",
        },
        "training_data": {
            "name": dataset.name,
            "study_dates": {
                "from": str(dates.min().date()) if len(dates) else None,
                "until": str(request.until),
                "latest_used": str(dates.max().date()) if len(dates) else None,
            },
            "studies": studies_in["train"] + studies_in["val"],
            "splits": {
                "train": {"studies": studies_in["train"], "images": int((split == "train").sum())},
                "val": {"studies": studies_in["val"], "images": int((split == "val").sum())},
                "test": {
                    "studies": int(later.images["study_instance_uid"].nunique()),
                    "images": len(later.images),
                    "what": f"studies dated after {request.until} (the later period)",
                },
            },
            "labels": "batchscan report labels (uncertain reports left out)",
        },
        "split": {
            "unit": "patient (the scan's pseudonymised patient key; a study without one is its "
            "own patient), stratified by label and view",
            "shares": {"train": 1 - VALIDATION_SHARE, "val": VALIDATION_SHARE},
            "seed": request.seed,
        },
        "base_model": {"version": scan.base.version, "name": scan.base.card.get("name")},
        "mode": "fine_tune" + ("_after_simsiam_pretraining" if request.pretrain else ""),
        "pretraining": pretrained.facts if pretrained is not None else None,
        "balance": {"by": request.balance},
        "limits": [
            "Not a medical device; not for diagnosis; every flag needs a radiologist's read.",
            "Learned from this site's report labels, which are noisy: its figures hold for "
            "studies like those it learned from and must be checked again when they change.",
            "Sees a 28 x 28 pixel picture (upsampled to 64 x 64): fine findings are invisible.",
        ],
        **(card_facts or {}),
    }
    out_path = request.out / f"{request.name}.keras"
    return write_model(model, report, dataset, config, out_path, "batchscan adapt", facts)


def report_adaptation(
    request: AdaptRequest,
    scan: ScanInUse,
    periods: Periods,
    label_facts: dict[str, Any],
    model: Any,
    card: dict[str, Any],
) -> Adaptation:
    """Score the later studies with the new model, measure it against the model in use
    (:func:`measure`), decide (:func:`verdict`) and write adaptation.json and
    adaptation.html (:func:`write_adaptation`)."""
    from batchscan.site.training import predict_scores

    earlier, later = periods.earlier, periods.later
    out_path = request.out / f"{request.name}.keras"
    new_card = check_model(out_path)
    in_use = {"version": scan.in_use.version, "threshold": scan.in_use.threshold}
    new = {"version": new_card.version, "threshold": new_card.threshold}

    later_images = later.images.copy()
    later_images["new_score"] = (
        predict_scores(model, _as_x(later.inputs)) if len(later_images) else []
    )
    old_studies = study_frame(later_images, later_images["score"].to_numpy(), in_use["threshold"])
    new_studies = study_frame(later_images, later_images["new_score"].to_numpy(), new["threshold"])
    measured = measure(old_studies, new_studies["score"].to_numpy(), in_use, new)
    decision = verdict(measured, new["version"])
    splits = card["training_data"]["splits"]
    result = {
        "until": str(request.until),
        "report_dir": str(request.report_dir),
        "model_in_use": in_use,
        "new_model": {**new, "path": str(out_path), "card": str(out_path.with_suffix(".json"))},
        "labels": label_facts,
        "accounting": dict(periods.accounting),
        "periods": {
            "training": {
                "studies": card["training_data"]["studies"],
                "train_studies": splits["train"]["studies"],
                "validation_studies": splits["val"]["studies"],
                "pneumonia_studies": int(
                    earlier.images.groupby("study_instance_uid")["label"].first().sum()
                ),
                "first_date": card["training_data"]["study_dates"]["from"],
                "last_date": card["training_data"]["study_dates"]["latest_used"],
            },
            "later": {
                "studies": measured["n"],
                "pneumonia_studies": measured["n_pneumonia"],
                "first_date": str(later.images["date"].min().date()) if len(later_images) else None,
                "last_date": str(later.images["date"].max().date()) if len(later_images) else None,
            },
            "pretraining_images": int(card["pretraining"]["images"])
            if card.get("pretraining")
            else 0,
        },
        "patients_known": bool(earlier.images["patient_key"].notna().any()),
        "validation": {"auc": card["metrics"].get("val_auc"), "threshold": card["threshold"]},
        "measured": measured,
        "verdict": decision,
        "points": {
            "label": old_studies["label"].tolist(),
            "in_use": old_studies["score"].tolist(),
            "new": new_studies["score"].tolist(),
            "view": old_studies["view"].tolist(),
        },
    }
    figures = (
        _error_figures(model, later_images, later.inputs, new["threshold"])
        if len(later_images)
        else {}
    )
    written = write_adaptation(result, request.out, figures)
    return Adaptation(result, written)


def run_adaptation(
    request: AdaptRequest, labeler: Callable[[], ReportLabeler] = ReportLabeler
) -> Adaptation:
    """Label, split by date, (pretrain,) train, measure both models on the later studies,
    write the model, its card, adaptation.json and adaptation.html, and say whether to
    deploy.

    Raises
    ------
    AdaptError
        No scan or no labels in REPORT_DIR, a base that is not the seed architecture, or
        too few labelled training-period studies to split (the message gives the counts).
    batchscan.scoring.model.ModelError
        The model in use (or ``--base``) cannot be loaded.
    """
    from batchscan.site.pretrain import with_backbone
    from batchscan.site.training import train

    scan = open_scan(request)
    labels, label_facts = site_labels(request.report_dir, request.reports_file, labeler)
    periods = load_periods(request, scan, select_rows(request, scan, labels))
    base = load_base(scan)
    pretrained = pretraining(request, base, periods.films) if request.pretrain else None
    if pretrained is not None:
        base = with_backbone(base, pretrained)
    dataset, weights = training_set(request, periods)
    config = train_config(request)
    trained = train(dataset, config, base=base, sample_weight=weights)
    card = write_site_model(request, scan, periods, trained, dataset, config, pretrained)
    return report_adaptation(request, scan, periods, label_facts, trained[0], card)


def summary(result: dict[str, Any]) -> str:
    """What the command prints before its verdict line."""
    m = result["measured"]
    c = m["comparison"]
    t, later = result["periods"]["training"], result["periods"]["later"]
    lines = [
        f"batchscan adapt: trained {result['new_model']['version']} on {t['train_studies']} "
        f"studies and validated on {t['validation_studies']} (dated {t['first_date']} to "
        f"{t['last_date']}, {t['pneumonia_studies']} pneumonia); measured on {later['studies']} "
        f"later studies ({later['pneumonia_studies']} pneumonia, {later['first_date']} to "
        f"{later['last_date']})"
        + (
            f"; SimSiam pretraining on {result['periods']['pretraining_images']} films"
            if result["periods"]["pretraining_images"]
            else ""
        ),
    ]
    for role, name in (("model_in_use", "model in use"), ("shadow", "new model")):
        g = c[role]
        key = "in_use" if role == "model_in_use" else "new"
        w = m["within_views"][key]
        lines.append(
            f"{name} {g['version']}: AUC {fmt(g['auc'])} (95 % CI {fmt(g['auc_ci95'])}), "
            f"within views {fmt(w['auc'])} (95 % CI {fmt(w['auc_ci95'])}); sensitivity "
            f"{fmt(g['sensitivity'])}, specificity {fmt(g['specificity'])} at its threshold"
        )
    lines.append(
        "by view: "
        + "; ".join(
            f"{view} n={v['n']} AUC {fmt(v['in_use']['auc'])} -> {fmt(v['new']['auc'])}"
            for view, v in m["by_view"].items()
        )
    )
    if not result["patients_known"]:
        lines.append(
            "the scan had no pseudonym key: patients are not known, so a later study of a "
            "patient seen in training cannot be left out"
        )
    return "\n".join(lines)


def render_html(result: dict[str, Any], figures: dict[str, list[str]]) -> str:
    """``adaptation.html``: one self-contained page (inline SVG, no script, no URL)."""
    e = html.escape
    m = result["measured"]
    c = m["comparison"]
    y = np.asarray(result["points"]["label"], dtype=int)
    deploy = result["verdict"]["deploy"]
    box = "ok" if deploy else "warn"
    charts = ""
    if y.size and y.any() and (y == 0).any():
        charts = plots.rocs_svg(
            y,
            {
                f"new model, AUC {fmt(c['shadow']['auc'])}": np.asarray(result["points"]["new"]),
                f"model in use, AUC {fmt(c['model_in_use']['auc'])}": np.asarray(
                    result["points"]["in_use"]
                ),
            },
            "ROC on the later studies",
        )
    rows = []
    for role, key, name in (
        ("model_in_use", "in_use", "model in use"),
        ("shadow", "new", "new model"),
    ):
        g, w = c[role], m["within_views"][key]
        rows.append(
            (
                f"{name} {g['version']}",
                g["auc"],
                fmt(g["auc_ci95"]),
                w["auc"],
                fmt(w["auc_ci95"]),
                g["sensitivity"],
                g["specificity"],
            )
        )
    overall = plots.table(
        ["model", "AUC", "95 % CI", "within views", "95 % CI", "sensitivity", "specificity"],
        rows,
    )
    views = plots.table(
        ["view", "studies", "pneumonia", "AUC in use", "AUC new", "sens. new", "spec. new"],
        [
            (
                view,
                v["n"],
                v["pneumonia"],
                v["in_use"]["auc"],
                v["new"]["auc"],
                v["new"]["sensitivity"],
                v["new"]["specificity"],
            )
            for view, v in m["by_view"].items()
        ],
    )
    w = m["within_views"]
    differences = (
        f"<p>Paired AUC difference (new minus in use): {e(fmt(c['auc_difference']))} (95 % CI "
        f"{e(fmt(c['auc_difference_ci95']))}); pooled within views: {e(fmt(w['difference']))} "
        f"(95 % CI {e(fmt(w['difference_ci95']))}). Both intervals are paired bootstraps over "
        "the later studies.</p>"
    )
    errors = ""
    if figures and any(figures.values()):
        errors = (
            "<h2>The new model's worst errors on the later studies</h2><p class='note'>Each "
            "image: the 64 x 64 input the model saw, enlarged, with the places that raised "
            "its score (HiResCAM; blue to red: more), and the input itself. A map on a "
            "marker, a tube or the edge of the picture is a shortcut.</p>"
            + "".join(
                f"<h3>{title}</h3><div class='sheet maps'>{''.join(figures[key])}</div>"
                for key, title in (
                    ("false_positives", "Reported normal, scored highest"),
                    ("false_negatives", "Reported pneumonia, scored lowest"),
                )
                if figures.get(key)
            )
        )
    accounting = plots.table(["", "count"], list(result["accounting"].items()))
    t, later = result["periods"]["training"], result["periods"]["later"]
    body = f"""<h1>Site adaptation up to {e(result["until"])}</h1>
<div class="{box}"><p><b>{e(result["verdict"]["line"])}</b></p></div>
<p>Trained on {t["train_studies"]} studies and validated on {t["validation_studies"]}
(dated {e(str(t["first_date"]))} to {e(str(t["last_date"]))}); measured on {later["studies"]}
later studies ({later["pneumonia_studies"]} pneumonia, dated {e(str(later["first_date"]))} to
{e(str(later["last_date"]))}). Nothing dated after {e(result["until"])} was used for training,
validation, the threshold or pretraining. Labels come from the radiology reports and are
noisy: a figure here is the agreement with the reports, not with the truth.</p>
<h2>Both models on the later studies</h2>
{overall}
{differences}
<div class="charts">{charts}</div>
<h2>Within each view</h2>
<p class="note">Sick patients are filmed AP more often: a model can score well overall by
recognising the view. The pooled within-view AUC compares only studies of the same view.</p>
{views}
{shortcut_html(m.get("shortcuts"), c["shadow"]["auc"])}
{errors}
<h2>Accounting</h2>
{accounting}"""
    return plots.page(f"batchscan adaptation: {result['new_model']['version']}", body)


def write_adaptation(
    result: dict[str, Any], out: Path, figures: dict[str, list[str]]
) -> list[Path]:
    """Write adaptation.json and adaptation.html into `out` (each replaced atomically,
    readable by owner and group only)."""
    written = []
    for name, text in (
        (JSON_FILE, json.dumps(result, indent=2, default=str) + "\n"),
        (HTML_FILE, render_html(result, figures)),
    ):
        path = out / name
        files.write(path, text)
        written.append(path)
    return written


def parse_until(text: str) -> date:
    """``--until``: an ISO date (YYYY-MM-DD).

    Raises
    ------
    ValueError
        Anything else.
    """
    return date.fromisoformat(text)


__all__ = [
    "AdaptError",
    "AdaptRequest",
    "Adaptation",
    "Period",
    "Periods",
    "ScanInUse",
    "Selection",
    "load_base",
    "load_periods",
    "measure",
    "open_scan",
    "parse_until",
    "pretraining",
    "read_scan",
    "report_adaptation",
    "run_adaptation",
    "select_rows",
    "site_labels",
    "summary",
    "train_config",
    "training_set",
    "verdict",
    "write_site_model",
]
