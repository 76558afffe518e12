"""The retrospective audit: the model measured on a hospital's own labelled studies.

``batchscan evaluate REPORT_DIR --labels LABELS.csv`` joins the study scores of a finished
scan (``studies.parquet``) with the site's labels and says how well the scores separate
pneumonia from normal *on this archive*, which no model card can say. It is the step a
hospital takes before it trusts a flag (and after ``batchscan train``, on studies the new
model did not learn from).

Labels file: CSV with a header naming the join key, ``accession_number`` or
``study_instance_uid`` (exactly one of them), and ``label``: ``1``/``0`` or ``pneumonia``/
``normal`` (any case), or ``uncertain`` (what ``batchscan labels`` writes for a hedged
report). Other columns are ignored. Uncertain rows are left out and counted by default;
``uncertain="pneumonia"`` or ``"normal"`` counts them as that label instead (the CheXpert
labeler's U-Ones and U-Zeros policies). A malformed file is refused as a whole
(:class:`LabelsError`, exit 2) with its line and problem: a half-read labels file would
give a figure that looks right and is not. A key given twice with the same label counts
once and is reported; a key given with both labels is reported and left out, never resolved
by guessing.

What is measured, overall and per subgroup (``age_group``, ``in_domain``, view, modality,
manufacturer): AUC with a 95 % bootstrap interval; sensitivity, specificity, PPV and NPV at
the model card's threshold (the one the scan flags with); the threshold that reaches a
chosen sensitivity on these studies and what it costs in specificity; the expected
calibration error. Prevalence here is the labelled set's, so PPV and NPV hold for a
population with the same prevalence only.
"""

from __future__ import annotations

import contextlib
import csv
import html
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import pandas as pd

from batchscan.results import plots
from batchscan.results.report import MANIFEST_FILE, STUDIES_FILE
from batchscan.results.saliency import Figure
from batchscan.site import metrics
from batchscan.storage import files

KEYS: Final = ("accession_number", "study_instance_uid")
LABEL_COLUMN: Final = "label"
_LABEL_VALUES: Final = {"1": 1, "0": 0, "pneumonia": 1, "normal": 0}
UNCERTAIN: Final = "uncertain"
#: What an ``uncertain`` row becomes: left out (default), or counted as pneumonia or normal.
UNCERTAIN_POLICIES: Final = ("drop", "pneumonia", "normal")
UncertainPolicy = Literal["drop", "pneumonia", "normal"]
#: Subgroups: the study column each is read from (``view`` is made from the scored images).
SUBGROUPS: Final = ("age_group", "in_domain", "view", "modality", "manufacturer")
#: Header attributes checked as shortcuts: each alone as a predictor of the labels, and the
#: model's AUC within each of their strata.
SHORTCUT_ATTRIBUTES: Final = (
    "view",
    "modality",
    "manufacturer",
    "manufacturer_model",
    "patient_sex",
    "age_group",
)
#: A warning when an attribute alone separates the labels at least this well (the lower
#: 95 % bound of its AUC, values held by fewer than MIN_STUDIES_PER_VALUE studies pooled,
#: so that chance does not warn)...
ATTRIBUTE_AUC_WARNING: Final = 0.60
#: ... or when the model's AUC within views falls more than this below its overall AUC
#: (and the lower 95 % bound of the fall is above 0)...
WITHIN_VIEW_DROP_WARNING: Final = 0.05
#: ... and only with at least this many labelled studies of each class: below, the figures
#: are printed without a warning (a warning from five studies teaches users to ignore
#: warnings).
MIN_STUDIES_PER_CLASS: Final = 20
#: Values of an attribute held by fewer studies are pooled into one before its AUC is
#: bounded: five studies from five devices "predict" their labels perfectly, by chance.
MIN_STUDIES_PER_VALUE: Final = 10
DEFAULT_TARGET_SENSITIVITY: Final = 0.90
JSON_FILE: Final = "evaluation.json"
HTML_FILE: Final = "evaluation.html"
#: Keys listed in the printed summary and in the HTML page (the JSON lists them all).
SHOWN: Final = 20
#: False positives and false negatives shown in evaluation.html with their maps.
ERRORS_SHOWN: Final = 6


class LabelsError(ValueError):
    """A labels file that cannot be used (exit 2); the message names the line."""


class EvaluationError(ValueError):
    """REPORT_DIR holds no scan to evaluate, or an option is out of range (exit 2)."""


@dataclass(slots=True)
class Labels:
    """A parsed labels file.

    Attributes
    ----------
    key:
        The join column, ``accession_number`` or ``study_instance_uid``.
    values:
        Label (1 pneumonia, 0 normal) per key, conflicting keys left out.
    duplicates:
        Keys given more than once with the same label (counted once).
    conflicts:
        Keys given with both labels (left out of every figure).
    rows:
        Data lines read.
    uncertain:
        Rows labelled ``uncertain`` (left out under the ``drop`` policy, else counted as
        the policy's label).
    uncertain_policy:
        ``drop``, ``pneumonia`` or ``normal``.
    uncertain_keys:
        Keys whose every row is ``uncertain`` and that were left out (``drop`` only).
    """

    key: str
    values: dict[str, int]
    duplicates: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    rows: int = 0
    uncertain: int = 0
    uncertain_policy: str = "drop"
    uncertain_keys: list[str] = field(default_factory=list)


def parse_label(text: str) -> int | None:
    """1 for ``1``/``pneumonia``, 0 for ``0``/``normal`` (any case, spaces ignored); None
    for anything else."""
    return _LABEL_VALUES.get(text.strip().lower())


def read_labels(path: Path, uncertain: UncertainPolicy = "drop") -> Labels:
    """Read and check a labels file (see the module docstring).

    Parameters
    ----------
    path:
        The labels file.
    uncertain:
        What an ``uncertain`` row becomes: ``drop`` (left out, counted), ``pneumonia`` or
        ``normal``.

    Raises
    ------
    LabelsError
        Unreadable, not UTF-8, no usable header, a line with the wrong number of fields,
        an empty key, a label that is not 0/1, normal/pneumonia or uncertain, no label at
        all, or an unknown `uncertain` policy.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise LabelsError(
            f"uncertain labels: {uncertain!r} is not one of {', '.join(UNCERTAIN_POLICIES)}"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LabelsError(f"labels file not found: {path}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise LabelsError(f"{path} line {line}: not UTF-8 text") from None
    except OSError as exc:
        raise LabelsError(f"cannot read labels file {path}: {exc.strerror}") from None
    reader = csv.reader(text.splitlines())
    try:
        header = [name.strip().lower() for name in next(reader)]
    except StopIteration:
        raise LabelsError(f"{path}: empty file (expected a header line)") from None
    except csv.Error as exc:
        raise LabelsError(f"{path} line 1: {exc}") from None
    keys = [k for k in KEYS if k in header]
    if len(keys) != 1 or LABEL_COLUMN not in header:
        raise LabelsError(
            f"{path} line 1: the header must name exactly one of accession_number, "
            f"study_instance_uid and a label column; found {','.join(header) or 'nothing'}"
        )
    key = keys[0]
    key_at, label_at = header.index(key), header.index(LABEL_COLUMN)
    seen: dict[str, int] = {}
    duplicates: set[str] = set()
    conflicts: set[str] = set()
    rows = n_uncertain = 0
    dropped: set[str] = set()
    try:
        for line_number, fields in enumerate(reader, start=2):
            if not fields or all(not f.strip() for f in fields):
                continue  # blank line
            if len(fields) != len(header):
                raise LabelsError(
                    f"{path} line {line_number}: {len(fields)} fields, the header has {len(header)}"
                )
            value = fields[key_at].strip()
            if not value:
                raise LabelsError(f"{path} line {line_number}: empty {key}")
            label = parse_label(fields[label_at])
            if fields[label_at].strip().lower() == UNCERTAIN:
                rows += 1
                n_uncertain += 1
                if uncertain == "drop":
                    dropped.add(value)
                    continue
                label = _LABEL_VALUES[uncertain]
            elif label is None:
                raise LabelsError(
                    f"{path} line {line_number}: label {fields[label_at]!r} is not "
                    "0/1, normal/pneumonia or uncertain"
                )
            else:
                rows += 1
            if value in seen:
                (duplicates if seen[value] == label else conflicts).add(value)
            else:
                seen[value] = label
    except csv.Error as exc:
        raise LabelsError(f"{path} line {reader.line_num}: {exc}") from None
    if rows == 0:
        raise LabelsError(f"{path}: no labels after the header")
    if not seen:
        raise LabelsError(f"{path}: all {rows} labels are uncertain (see --uncertain)")
    duplicates -= conflicts
    values = {k: v for k, v in seen.items() if k not in conflicts}
    return Labels(
        key,
        values,
        sorted(duplicates),
        sorted(conflicts),
        rows,
        n_uncertain,
        uncertain,
        sorted(dropped - seen.keys()),
    )


@dataclass(frozen=True, slots=True)
class GroupMetrics:
    """The figures of one set of labelled studies (None where undefined, e.g. an AUC
    with one class only)."""

    n: int
    n_positive: int
    auc: float | None
    auc_ci95: tuple[float, float] | None
    sensitivity: float | None
    specificity: float | None
    ppv: float | None
    npv: float | None
    ece: float | None
    target_threshold: float | None
    target_sensitivity_reached: float | None
    target_specificity: float | None


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest threshold t with sensitivity >= `target` (positive when score >= t)."""
    positives = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(labels).astype(bool)])
    needed = math.ceil(target * len(positives) - 1e-9)
    return float(positives[len(positives) - max(needed, 1)])


def group_metrics(
    labels: np.ndarray, scores: np.ndarray, threshold: float, target: float, seed: int = 0
) -> GroupMetrics:
    """All figures of one group at the card `threshold` and the `target` sensitivity."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    positive = s >= threshold
    tp, fp = int((positive & y).sum()), int((positive & ~y).sum())
    fn, tn = int((~positive & y).sum()), int((~positive & ~y).sum())
    both = bool(y.any() and (~y).any())
    target_t = threshold_for_sensitivity(y, s, target) if y.any() else None
    at_target = s >= target_t if target_t is not None else None
    return GroupMetrics(
        n=int(y.size),
        n_positive=int(y.sum()),
        auc=metrics.roc_auc(y, s) if both else None,
        auc_ci95=metrics.bootstrap_auc_interval(y, s, seed=seed) if both and y.size > 2 else None,
        sensitivity=_ratio(tp, tp + fn),
        specificity=_ratio(tn, tn + fp),
        ppv=_ratio(tp, tp + fp),
        npv=_ratio(tn, tn + fn),
        ece=metrics.expected_calibration_error(y, s) if y.size else None,
        target_threshold=target_t,
        target_sensitivity_reached=_ratio(int((at_target & y).sum()), int(y.sum()))
        if at_target is not None
        else None,
        target_specificity=_ratio(int((~at_target & ~y).sum()), int((~y).sum()))
        if at_target is not None
        else None,
    )


def compare_shadow(
    y: np.ndarray,
    s: np.ndarray,
    shadow_scores: np.ndarray,
    model: dict[str, Any],
    shadow: dict[str, Any],
    target: float,
) -> dict[str, Any]:
    """The model in use against the shadow model on the same labelled studies: each one's
    figures at its own card threshold, the paired AUC difference (shadow minus in use)
    with its 95 % bootstrap CI, and a sentence saying which is better or that the
    difference is within noise."""
    both = bool(y.any() and (~y.astype(bool)).any())
    in_use = group_metrics(y, s, float(model["threshold"]), target)
    other = group_metrics(y, shadow_scores, float(shadow["threshold"]), target)
    difference, interval = (
        metrics.paired_auc_difference(y, s, shadow_scores) if both else (None, None)
    )
    if difference is None or interval is None:
        verdict = (
            f"too few labelled studies of both classes ({int(y.sum())} pneumonia, "
            f"{int((y == 0).sum())} normal) to compare the two models"
        )
    else:
        figures = f"AUC {other.auc:.3f} against {in_use.auc:.3f}, difference {difference:+.3f} " + (
            f"(95 % CI {interval[0]:+.3f} to {interval[1]:+.3f}) on {len(y)} studies"
        )
        if interval[0] > 0:
            verdict = f"the shadow model {shadow['version']} is better: {figures}"
        elif interval[1] < 0:
            verdict = f"the model in use {model['version']} is better: {figures}"
        else:
            verdict = f"the difference is within noise, neither model is shown better: {figures}"
    return {
        "model_in_use": {"version": model["version"], **asdict(in_use)},
        "shadow": {"version": shadow["version"], **asdict(other)},
        "n": len(y),
        "auc_difference": difference,
        "auc_difference_ci95": interval,
        "verdict": verdict,
    }


def _study_table(report_dir: Path) -> pd.DataFrame:
    """Scored studies with the subgroup columns (``view``: the views of scored images)."""
    studies = pd.read_parquet(report_dir / STUDIES_FILE)
    images_path = report_dir / "images.parquet"
    if images_path.is_file():
        images = pd.read_parquet(
            images_path, columns=["study_instance_uid", "status", "view"]
        ).query("status == 'scored'")
        views = images.groupby("study_instance_uid")["view"].agg(
            lambda v: ",".join(sorted({str(x) for x in v.dropna()})) or None
        )
        studies["view"] = studies["study_instance_uid"].map(views)
    else:
        studies["view"] = None
    for name in (*SUBGROUPS, *SHORTCUT_ATTRIBUTES):
        if name not in studies:
            studies[name] = None
    return studies


def _worst(
    matched: pd.DataFrame, keys: np.ndarray, mask: np.ndarray, *, descending: bool
) -> list[dict[str, Any]]:
    """The :data:`ERRORS_SHOWN` studies of `mask` furthest on the wrong side (by score)."""
    rows = matched[mask].assign(error_key=keys[mask])
    rows = rows.sort_values(["score", "study_instance_uid"], ascending=[not descending, True])
    return [
        {"key": str(r.error_key), "study_instance_uid": str(r.study_instance_uid), "score": r.score}
        for r in rows.head(ERRORS_SHOWN).itertuples()
    ]


def explain_errors(report_dir: Path, result: dict[str, Any]) -> dict[str, Figure]:
    """Pictures and maps (:mod:`batchscan.results.saliency`) of the shown errors' top-scored images,
    made again from the archive through the scan's stages with the scan's model; per study
    UID. Empty when the archive or the model is gone; a study whose file cannot be made
    again is left out (its row stays in the table)."""
    from batchscan.results.saliency import explain_file, run_explainer, shown_options

    uids = [e["study_instance_uid"] for rows in result["errors"].values() for e in rows]
    manifest = json.loads((report_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    archive = Path(str(manifest.get("arguments", {}).get("archive")))
    if not uids or not archive.is_dir():
        return {}
    try:
        explainer = run_explainer(manifest)
    except Exception:  # the model moved since the scan: no maps to draw
        return {}
    columns = ["study_instance_uid", "status", "score", "path", "path_bytes"]
    images = pd.read_parquet(report_dir / "images.parquet", columns=columns)
    images = images[(images["status"] == "scored") & images["study_instance_uid"].isin(uids)]
    best = images.sort_values(["score", "path"], ascending=[False, True]).drop_duplicates(
        "study_instance_uid"
    )
    options = shown_options(manifest)
    figures = {}
    for row in best.itertuples():
        name = os.fsdecode(row.path_bytes) if row.path_bytes is not None else row.path
        try:
            figures[row.study_instance_uid] = explain_file(archive / name, options, explainer)
        except Exception:  # moved, changed or gone since the scan
            continue
    return figures


def _strata(column: pd.Series) -> np.ndarray:
    """A header column's values as strata: missing ones "unknown", booleans as "true" /
    "false" (as subgroups and the shortcut check both name them)."""
    values = column.astype(object).where(column.notna(), "unknown")
    return values.map(lambda v: str(v).lower() if isinstance(v, bool) else str(v)).to_numpy()


def _pool_rare(strata: np.ndarray) -> np.ndarray:
    """`strata` with the values of fewer than :data:`MIN_STUDIES_PER_VALUE` studies as one."""
    values, counts = np.unique(strata, return_counts=True)
    rare = set(values[counts < MIN_STUDIES_PER_VALUE].tolist())
    return np.array(["\0rare" if v in rare else v for v in strata], dtype=object)


def _view_drop(
    y: np.ndarray, scores: np.ndarray, strata: np.ndarray, idx: np.ndarray
) -> float | None:
    """The overall AUC minus the within-stratum AUC on the resample `idx`."""
    s = np.asarray(scores)
    within, _ = metrics.within_stratum_auc(y[idx], s[idx], strata[idx])
    return None if within is None else metrics.roc_auc(y[idx], s[idx]) - within


def shortcut_checks(
    studies: pd.DataFrame, labels: np.ndarray, scores: np.ndarray, overall_auc: float | None
) -> dict[str, Any]:
    """For each header attribute (:data:`SHORTCUT_ATTRIBUTES`): its AUC alone as a predictor
    of the labels (:func:`batchscan.site.metrics.attribute_auc`) and the model's AUC within its
    strata (:func:`batchscan.site.metrics.within_stratum_auc`), with warnings.

    Why: where sick patients are filmed AP at the bedside and healthy ones PA standing, the
    view alone predicts the label; a model (or a site's fine-tuning) can then score well by
    recognising the view, and an overall AUC cannot tell. The within-stratum AUC can.
    """
    attributes: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    enough = min(n_pos, n_neg) >= MIN_STUDIES_PER_CLASS
    for name in SHORTCUT_ATTRIBUTES:
        strata = _strata(studies[name])
        alone = metrics.attribute_auc(labels, strata)
        pooled = _pool_rare(strata)
        alone_ci = (
            metrics.paired_bootstrap(
                y, lambda i, p=pooled: metrics.attribute_auc(y[i], p[i]), resamples=500
            )
            if alone is not None
            else None
        )
        within, pairs = metrics.within_stratum_auc(labels, scores, strata)
        drop = overall_auc - within if within is not None and overall_auc is not None else None
        drop_ci = (
            metrics.paired_bootstrap(
                y, lambda i, st=strata: _view_drop(y, scores, st, i), resamples=500
            )
            if name == "view" and drop is not None
            else None
        )
        alone_flag = enough and alone_ci is not None and alone_ci[0] >= ATTRIBUTE_AUC_WARNING
        drop_flag = (
            enough
            and drop is not None
            and drop > WITHIN_VIEW_DROP_WARNING
            and drop_ci is not None
            and drop_ci[0] > 0
        )
        attributes[name] = {
            "values": len(set(strata.tolist())),
            "attribute_auc": alone,
            "attribute_auc_ci95": alone_ci,
            "within_auc": within,
            "within_pairs": pairs,
            "drop_from_overall": drop,
            "drop_ci95": drop_ci,
            "warning": alone_flag or drop_flag,
        }
        if alone_flag:
            warnings.append(
                f"{name} alone predicts the labels at AUC {alone:.3f} "
                f"(95 % CI {fmt(alone_ci)}, lower bound >= {ATTRIBUTE_AUC_WARNING:.2f}; "
                f"{n_pos} pneumonia, {n_neg} normal): a model can score well by recognising "
                f"the {name}; the model's AUC within {name} is {fmt(within)}"
            )
        if drop_flag:
            warnings.append(
                f"within {name} the model's AUC is {within:.3f}, {drop:.3f} below its overall "
                f"{overall_auc:.3f} (95 % CI of the fall {fmt(drop_ci)}): part of the overall "
                f"figure comes from the {name}, not from the lungs"
            )
    return {
        "attributes": attributes,
        "warnings": warnings,
        "n_pneumonia": n_pos,
        "n_normal": n_neg,
        "enough_to_warn": enough,
        "rules": {
            "attribute_auc_warning": ATTRIBUTE_AUC_WARNING,
            "within_view_drop_warning": WITHIN_VIEW_DROP_WARNING,
            "min_studies_per_class": MIN_STUDIES_PER_CLASS,
            "min_studies_per_value": MIN_STUDIES_PER_VALUE,
        },
    }


def evaluate(
    report_dir: Path, labels: Labels, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
) -> dict[str, Any]:
    """Join `labels` with the scan's studies in `report_dir` and measure.

    Returns
    -------
    dict
        The content of ``evaluation.json``: ``model``, ``labels`` (the file's accounting),
        ``overall`` and ``subgroups`` (:class:`GroupMetrics` as dicts), the unmatched keys,
        and the scores with labels for the charts (``points``).

    Raises
    ------
    EvaluationError
        If `report_dir` holds no finished scan or `target_sensitivity` is not in (0, 1].
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise EvaluationError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity:g}")
    manifest_path = report_dir / MANIFEST_FILE
    if not (report_dir / STUDIES_FILE).is_file() or not manifest_path.is_file():
        raise EvaluationError(
            f"{report_dir} holds no batchscan reports (studies.parquet and manifest.json); "
            "run batchscan scan first"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        model = manifest["model"]
        threshold = float(model["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvaluationError(f"cannot read {manifest_path}: {exc}") from exc
    studies = _study_table(report_dir)
    key = studies[labels.key].astype(object).where(studies[labels.key].notna(), None)
    key = key.map(lambda v: None if v is None else str(v))
    labelled = key.isin(labels.values.keys()).to_numpy()
    matched = studies[labelled].copy()
    matched["label"] = key[labelled].map(labels.values).astype(int).to_numpy()
    counts = key[labelled].value_counts()
    shared = sorted(str(k) for k in counts[counts > 1].index)
    left_out = key.isin(labels.conflicts) | key.isin(labels.uncertain_keys)
    uncertain_scored = int((key.isin(labels.uncertain_keys) & ~key.isin(labels.values)).sum())
    unlabelled = studies[~labelled & ~left_out.to_numpy()]
    without_label = sorted(
        str(k if k is not None else uid)
        for k, uid in zip(key[unlabelled.index], unlabelled["study_instance_uid"], strict=True)
    )
    present = set(key.dropna())
    unmatched = sorted(k for k in labels.values if k not in present)
    y, s = matched["label"].to_numpy(), matched["score"].to_numpy(dtype=np.float64)
    overall = group_metrics(y, s, threshold, target_sensitivity)
    subgroups: dict[str, dict[str, Any]] = {}
    for name in SUBGROUPS:
        values = _strata(matched[name])
        subgroups[name] = {
            str(value): asdict(
                group_metrics(y[mask], s[mask], threshold, target_sensitivity, seed=1)
            )
            for value in sorted(set(values.tolist()))
            for mask in [values == value]
        }
    shortcuts = shortcut_checks(matched, y, s, overall.auc)
    shadow = model.get("shadow")
    comparison = None
    if shadow and "shadow_score" in matched:
        paired = matched["shadow_score"].notna().to_numpy()
        comparison = compare_shadow(
            y[paired],
            s[paired],
            matched["shadow_score"].to_numpy(dtype=np.float64)[paired],
            model,
            shadow,
            target_sensitivity,
        )
    key_of = key[labelled].to_numpy()
    errors = {
        "false_positives": _worst(matched, key_of, (y == 0) & (s >= threshold), descending=True),
        "false_negatives": _worst(matched, key_of, (y == 1) & (s < threshold), descending=False),
    }
    return {
        "report_dir": str(report_dir),
        "model": {
            "version": model.get("version"),
            "threshold": threshold,
            "threshold_rule": model.get("threshold_rule"),
        },
        "scan_run_id": manifest.get("run_id"),
        "target_sensitivity": target_sensitivity,
        "labels": {
            "key": labels.key,
            "rows": labels.rows,
            "distinct_keys": len(labels.values) + len(labels.conflicts),
            "duplicates": labels.duplicates,
            "conflicts": labels.conflicts,
            "uncertain_rows": labels.uncertain,
            "uncertain_policy": labels.uncertain_policy,
            "uncertain_scored_studies_left_out": uncertain_scored,
            "matching_no_scored_study": unmatched,
            "matching_several_studies": shared,
        },
        "scored_studies": len(studies),
        "scored_studies_without_label": without_label,
        "overall": asdict(overall),
        "subgroups": subgroups,
        "shortcuts": shortcuts,
        "shadow_comparison": comparison,
        "errors": errors,
        "points": {"label": y.tolist(), "score": s.tolist()},
    }


def fmt(value: Any, digits: int = 3) -> str:
    """A figure as printed and shown: three decimals, ranges as low-high, n/a for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, list | tuple):
        return "-".join(fmt(v, digits) for v in value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (f" ... (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


def summary(result: dict[str, Any]) -> str:
    """What ``batchscan evaluate`` prints: a few lines a person reads in a terminal."""
    o, lab = result["overall"], result["labels"]
    target = result["target_sensitivity"]
    lines = [
        f"batchscan evaluate: {o['n']} labelled scored studies ({o['n_positive']} pneumonia, "
        f"{o['n'] - o['n_positive']} normal), joined by {lab['key']}; model "
        f"{result['model']['version']}",
        f"AUC {fmt(o['auc'])} (95 % CI {fmt(o['auc_ci95'])}); at the card threshold "
        f"{result['model']['threshold']:.3f}: sensitivity {fmt(o['sensitivity'])}, "
        f"specificity {fmt(o['specificity'])}, PPV {fmt(o['ppv'])}, NPV {fmt(o['npv'])}; "
        f"ECE {fmt(o['ece'])}",
        f"threshold for sensitivity >= {target:g}: {fmt(o['target_threshold'])} "
        f"(sensitivity {fmt(o['target_sensitivity_reached'])}, specificity "
        f"{fmt(o['target_specificity'])})",
        f"labels matching no scored study: {len(lab['matching_no_scored_study'])}; scored "
        f"studies without a label: {len(result['scored_studies_without_label'])}; duplicate "
        f"labels: {len(lab['duplicates'])}; conflicting labels (left out): "
        f"{len(lab['conflicts'])}",
    ]
    if lab.get("uncertain_rows"):
        policy = lab["uncertain_policy"]
        lines.append(
            f"uncertain labels: {lab['uncertain_rows']} rows, "
            + (
                f"left out ({lab['uncertain_scored_studies_left_out']} of them scored studies)"
                if policy == "drop"
                else f"counted as {policy}"
            )
        )
    for title, keys in (
        ("labels matching no scored study", lab["matching_no_scored_study"]),
        ("conflicting labels", lab["conflicts"]),
        ("labels matching several studies", lab["matching_several_studies"]),
    ):
        if keys:
            lines.append(f"  {title}: {_listing(keys)}")
    shortcuts = result.get("shortcuts") or {"attributes": {}, "warnings": []}
    if shortcuts["attributes"]:
        lines.append(
            "shortcut check (attribute alone -> labels AUC; model AUC within its strata): "
            + "; ".join(
                f"{name} {fmt(a['attribute_auc'])} / {fmt(a['within_auc'])}"
                for name, a in shortcuts["attributes"].items()
            )
        )
        if not shortcuts.get("enough_to_warn", True):
            lines.append(
                f"  too few labelled studies to warn of a shortcut ({shortcuts['n_pneumonia']} "
                f"pneumonia, {shortcuts['n_normal']} normal; a warning needs "
                f"{shortcuts['rules']['min_studies_per_class']} of each): the figures above "
                "are for reading, not for acting on"
            )
    lines += [f"WARNING: {w}" for w in shortcuts["warnings"]]
    comparison = result.get("shadow_comparison")
    if comparison:
        for role in ("model_in_use", "shadow"):
            m = comparison[role]
            lines.append(
                f"{role.replace('_', ' ')} {m['version']}: AUC {fmt(m['auc'])} (95 % CI "
                f"{fmt(m['auc_ci95'])}); at its threshold sensitivity {fmt(m['sensitivity'])}, "
                f"specificity {fmt(m['specificity'])}"
            )
        lines.append(f"shadow comparison: {comparison['verdict']}")
    for name, groups in result["subgroups"].items():
        parts = [
            f"{value} n={g['n']} AUC {fmt(g['auc'])} sens {fmt(g['sensitivity'])} "
            f"spec {fmt(g['specificity'])}"
            for value, g in groups.items()
        ]
        lines.append(f"  by {name}: " + "; ".join(parts))
    return "\n".join(lines)


_ROWS: Final = (
    ("studies", "n"),
    ("pneumonia", "n_positive"),
    ("AUC", "auc"),
    ("AUC 95 % CI", "auc_ci95"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("PPV", "ppv"),
    ("NPV", "npv"),
    ("ECE", "ece"),
    ("threshold for target sensitivity", "target_threshold"),
    ("  sensitivity there", "target_sensitivity_reached"),
    ("  specificity there", "target_specificity"),
)


def _table(columns: dict[str, dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        f"<tr><td>{html.escape(label)}</td>"
        + "".join(f'<td class="n">{html.escape(fmt(g[key]))}</td>' for g in columns.values())
        + "</tr>"
        for label, key in _ROWS
    )
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _subgroup_table(groups: dict[str, dict[str, Any]]) -> str:
    """One row per subgroup value, the figures across (compact where there are many)."""
    shown = [r for r in _ROWS if r[1] not in ("target_sensitivity_reached",)]
    head = "".join(f"<th>{html.escape(label.strip())}</th>" for label, _ in shown)
    body = "".join(
        f"<tr><td>{html.escape(value)}</td>"
        + "".join(f'<td class="n">{html.escape(fmt(g[key]))}</td>' for _, key in shown)
        + "</tr>"
        for value, g in groups.items()
    )
    return f"<table><tr><th>value</th>{head}</tr>{body}</table>"


def shortcut_html(shortcuts: dict[str, Any] | None, overall_auc: float | None) -> str:
    """The shortcut section: a marked box with the warnings when there are any, and the
    table of every attribute (its rows marked where it warns)."""
    if not shortcuts or not shortcuts["attributes"]:
        return ""
    e = html.escape
    flag = ' class="flag"'
    rows = "".join(
        f"<tr{flag if a['warning'] else ''}><td>{e(name)}</td>"
        f'<td class="n">{a["values"]}</td><td class="n">{e(fmt(a["attribute_auc"]))}</td>'
        f'<td class="n">{e(fmt(a.get("attribute_auc_ci95")))}</td>'
        f'<td class="n">{e(fmt(a["within_auc"]))}</td><td class="n">{a["within_pairs"]}</td>'
        f'<td class="n">{e(fmt(a["drop_from_overall"]))}</td></tr>'
        for name, a in shortcuts["attributes"].items()
    )
    table = (
        "<table><tr><th>attribute</th><th>values</th><th>AUC of the attribute alone</th>"
        "<th>its 95 % CI (rare values pooled)</th>"
        "<th>model AUC within its strata</th><th>positive-negative pairs within</th>"
        f"<th>below overall ({e(fmt(overall_auc))})</th></tr>{rows}</table>"
    )
    rules = shortcuts["rules"]
    note = (
        '<p class="note">The attribute alone: the AUC of ranking studies by the share of '
        "pneumonia among studies with the same value (the best that attribute allows here). "
        "Within its strata: the model's AUC over pairs of a pneumonia and a normal study with "
        "the same value, pooled. A warning when the lower 95 % bound of an attribute's AUC "
        "(bootstrap; values of fewer than "
        f"{rules.get('min_studies_per_value', 0)} studies pooled into one) reaches "
        f"{rules['attribute_auc_warning']:.2f}, or the within-view AUC falls "
        f"more than {rules['within_view_drop_warning']:.2f} below the overall one with a "
        "fall whose lower 95 % bound is above 0; and only with at least "
        f"{rules.get('min_studies_per_class', 0)} labelled studies of each class.</p>"
    )
    if not shortcuts.get("enough_to_warn", True):
        note += (
            f'<p class="note">Too few labelled studies to warn ({shortcuts["n_pneumonia"]} '
            f"pneumonia, {shortcuts['n_normal']} normal): the figures are for reading, not "
            "for acting on.</p>"
        )
    if shortcuts["warnings"]:
        items = "".join(f"<li>{e(w)}</li>" for w in shortcuts["warnings"])
        return (
            '<div class="warn"><h2>Shortcut check: warning</h2>'
            f"<ul>{items}</ul><p>Read the figures within the strata before the overall "
            f"ones.</p>{table}{note}</div>"
        )
    return f"<h2>Shortcut check</h2>{table}{note}"


def _errors_html(result: dict[str, Any], figures: dict[str, Figure]) -> str:
    """The worst errors at the card threshold, each with its picture and map when made."""
    errors = result.get("errors")
    if not errors or not any(errors.values()):
        return ""
    e = html.escape
    parts = [
        "<h2>The worst errors, and where their scores came from</h2>",
        '<p class="note">At the card threshold: the normal studies scored highest (false '
        "positives) and the pneumonia studies scored lowest (false negatives). Each image: "
        "the picture the model saw with a map of the places that raised its score (HiResCAM; "
        "blue to red: more), and the 64 x 64 model input. A map on a marker, a tube or the "
        "edge of the picture is a shortcut; one on the lungs is a reading the labels "
        "disagree with (or a label that is wrong).</p>",
    ]
    for title, rows in (
        ("False positives", errors["false_positives"]),
        ("False negatives", errors["false_negatives"]),
    ):
        if not rows:
            continue
        sheet = []
        for row in rows:
            made = figures.get(row["study_instance_uid"])
            caption = f"{row['key']} score {row['score']:.3f}"
            if made is None:  # the file could not be made again: the caption alone
                sheet.append(f"<figure><figcaption>{e(caption)}</figcaption></figure>")
            else:
                sheet.append(plots.figure(caption, made.model_input, made.overlay))
        parts.append(f"<h3>{title}</h3><div class='sheet maps'>{''.join(sheet)}</div>")
    return "".join(parts)


def _shadow_html(comparison: dict[str, Any] | None) -> str:
    if not comparison:
        return ""
    columns = {
        f"in use: {comparison['model_in_use']['version']}": comparison["model_in_use"],
        f"shadow: {comparison['shadow']['version']}": comparison["shadow"],
    }
    return (
        "<h2>Model in use against the shadow model</h2>"
        f"<p><b>{html.escape(comparison['verdict'])}</b></p>{_table(columns)}"
        "<p class='note'>Both models scored the same inputs of the same studies; each is "
        "measured at its own card threshold. The AUC difference's interval is a paired "
        "bootstrap over studies (both scores resampled together); an interval that holds 0 "
        "means these studies do not show either model better.</p>"
    )


def render_html(result: dict[str, Any], figures: dict[str, Figure] | None = None) -> str:
    """``evaluation.html``: one self-contained page (inline SVG charts, no script, no URL;
    pictures inline), with the errors' `figures` (per study UID) where they were made."""
    y = np.asarray(result["points"]["label"], dtype=int)
    s = np.asarray(result["points"]["score"], dtype=np.float64)
    o, lab, model = result["overall"], result["labels"], result["model"]
    e = html.escape
    charts = []
    if o["auc"] is not None:
        points = {
            f"card threshold {model['threshold']:.3f}": (
                1 - o["specificity"],
                o["sensitivity"],
            ),
        }
        if o["target_threshold"] is not None:
            points[f"sensitivity >= {result['target_sensitivity']:g}"] = (
                1 - o["target_specificity"],
                o["target_sensitivity_reached"],
            )
        charts.append(plots.roc_svg(y, s, points, f"ROC, AUC {fmt(o['auc'])}"))
    if len(y):
        charts.append(
            plots.calibration_svg(y, s, metrics.ECE_BINS, f"Calibration, ECE {fmt(o['ece'])}")
        )
        charts.append(
            plots.histogram_svg(
                {"normal": s[y == 0], "pneumonia": s[y == 1]},
                model["threshold"],
                "Study scores by label",
            )
        )
    subgroup_html = "".join(
        f"<h3>by {e(name)}</h3>{_subgroup_table(groups)}"
        for name, groups in result["subgroups"].items()
    )
    shortcut_section = shortcut_html(result.get("shortcuts"), o["auc"])
    accounting = [
        ("label rows read", lab["rows"]),
        ("distinct keys", lab["distinct_keys"]),
        ("scored studies in the report", result["scored_studies"]),
        ("labelled scored studies (measured)", o["n"]),
        ("labels matching no scored study", len(lab["matching_no_scored_study"])),
        ("scored studies without a label", len(result["scored_studies_without_label"])),
        ("keys given twice, same label (counted once)", len(lab["duplicates"])),
        ("keys given with both labels (left out)", len(lab["conflicts"])),
        (
            f"uncertain label rows ({lab.get('uncertain_policy', 'drop')})",
            lab.get("uncertain_rows", 0),
        ),
        ("labels matching several studies (each counted)", len(lab["matching_several_studies"])),
    ]
    listings = "".join(
        f"<p><b>{e(title)}</b> ({len(keys)}): {e(_listing(keys))}</p>"
        for title, keys in (
            ("Labels matching no scored study", lab["matching_no_scored_study"]),
            ("Scored studies without a label", result["scored_studies_without_label"]),
            ("Keys given with both labels", lab["conflicts"]),
            ("Keys given twice", lab["duplicates"]),
        )
        if keys
    )
    body = f"""<h1>Model evaluation on this archive's labelled studies</h1>
<p>Model <code>{e(str(model["version"]))}</code>, card threshold {model["threshold"]:.3f}
({e(str(model.get("threshold_rule") or ""))}). Reports of scan run
<code>{e(str(result["scan_run_id"]))}</code> in <code>{e(result["report_dir"])}</code>; labels
joined by <code>{e(lab["key"])}</code>.</p>
<h2>Overall</h2>
{_table({"all labelled studies": o})}
<p class="note">AUC interval: 95 % percentile bootstrap over studies. PPV and NPV depend on
the prevalence of this labelled set ({fmt(o["n_positive"] / o["n"] if o["n"] else None)}).
The threshold for the target sensitivity is chosen on these same studies: it is optimistic
for them, and a fair estimate only for new studies like them.</p>
<div class="charts">{"".join(charts)}</div>
{shortcut_section}
{_shadow_html(result.get("shadow_comparison"))}
<h2>Subgroups</h2>
<p class="note">A subgroup of a few studies gives a wide interval: read its n first.</p>
{subgroup_html}
{_errors_html(result, figures or {})}
<h2>Accounting of the labels</h2>
<table>{"".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in accounting)}</table>
{listings}"""
    return plots.page(f"batchscan evaluation: {model['version']}", body)


def last_overall_auc(report_dir: Path) -> float | None:
    """The overall AUC of the last ``batchscan evaluate`` written into `report_dir`, if any
    (the reference monitoring falls back to, :mod:`batchscan.site.monitoring`)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        value = json.loads((report_dir / JSON_FILE).read_text(encoding="utf-8"))["overall"]["auc"]
        return float(value) if value is not None else None
    return None


def write_evaluation(
    result: dict[str, Any], out_dir: Path, figures: dict[str, Figure] | None = None
) -> list[Path]:
    """Write ``evaluation.json`` and ``evaluation.html`` (with the errors' `figures`) to
    `out_dir` (each replaced atomically, :func:`batchscan.storage.files.write`); returns
    their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / JSON_FILE, out_dir / HTML_FILE
    files.write(json_path, json.dumps(result, indent=2) + "\n")
    files.write(html_path, render_html(result, figures))
    return [json_path, html_path]
