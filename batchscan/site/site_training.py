"""``batchscan train``: adapt the model to a site's own labelled archive, through the very
stages that score it.

A model is only as good as its match with the pictures it will score, and a hospital's
pictures differ from any public training set (population, devices, processing). Sites have
labels (radiology reports say normal or pneumonia for years of studies), so this command lets
a site fine-tune the seed CNN (or train it anew) on them and measure it before it scores the
nightly archive. Training must see exactly the pictures scoring will see, so the examples come
from the scan's own discovery, header, decode, normalize, preprocess and sanity stages, in
the scan's worker pool (:func:`batchscan.engines.pipeline.prepared_stream`), never from a separate
image loader; the training loop, calibration and threshold are those of the shipped model
(:func:`batchscan.site.training.train`), not a fork.

Rules:

* Every image of a labelled study that the scan would score is an example with the study's
  label (frontal chest radiographs by default, as the scan).
* The split is by patient: the pseudonymised patient key when the site configured one, else
  an HMAC of PatientID under a key derived from the seed, computed in the workers and held
  in memory only (never written, not even to the cache, which keeps group numbers); a study
  without a PatientID is its own group. No patient is on two sides. The card records the
  split by counts and seed only.
* The model inputs are cached (``MODEL_DIR/<name>.inputs.npz`` or ``--cache``), keyed by a
  fingerprint of the archive (paths, sizes, mtimes), the labels file and the stage settings,
  so a second training run on the same archive decodes nothing.
* Too few labelled studies per class to split is refused (:class:`TrainingError`, exit 2)
  with the numbers. The archive is only read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from batchscan.engines.pipeline import ScanConfig, prepared_stream
from batchscan.ingest.discover import iter_files
from batchscan.ingest.paths import from_state, readable, state_key
from batchscan.ingest.preprocess import PREPROCESSING_SPEC
from batchscan.ingest.records import SCORED, ImageRecord
from batchscan.ingest.sanity import BLANK_RULE
from batchscan.results.keys import header_key, input_key
from batchscan.results.state import STATE_FILE, final_rows
from batchscan.scoring.input_store import STORE_FILE, InputStore
from batchscan.scoring.model import ModelCard, check_model, load_model
from batchscan.site import metrics
from batchscan.site.evaluate import Labels
from batchscan.storage import files

#: Shares of patients (by studies) in train / val / test.
SPLIT_SHARES: Final = (0.70, 0.15, 0.15)
#: Fewest labelled studies of each class the command accepts (below, val and test would
#: hold one or two studies of a class and every figure would be noise).
MIN_STUDIES_PER_CLASS: Final = 10
#: Fine-tuning takes the shipped training's step and epochs: on a simulated hospital whose
#: processing differs (300 labelled studies, inverted and gamma-flattened Kermany pictures,
#: jobs/experiments/site_training_check.py) a step of 1e-4 moved the AUC on its later studies
#: from 0.31 to 0.69 only, 1e-3 to 0.87.
FINE_TUNE_LEARNING_RATE: Final = 1e-3
FINE_TUNE_EPOCHS: Final = 60
CACHE_VERSION: Final = 1


class TrainingError(ValueError):
    """The archive and labels cannot give a model (too few studies...): exit 2."""


@dataclass(slots=True)
class Examples:
    """Model inputs of the labelled images, with what the split and the card need.

    ``group`` numbers patients (0..P-1) without naming them; the other columns are per
    image.
    """

    inputs: np.ndarray
    label: np.ndarray
    group: np.ndarray
    study: list[str]
    age: np.ndarray
    view: list[str]
    modality: list[str]
    manufacturer: list[str]
    fingerprint: str
    files: int
    accounting: dict[str, int] = field(default_factory=dict)


def archive_fingerprint(records: list[ImageRecord]) -> str:
    """sha256 over the sorted (path, size, mtime) of every file found: changes when any file
    is added, removed or rewritten."""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: r.path):
        digest.update(f"{readable(record.path)}\0{record.size}\0{record.mtime_ns}\n".encode())
    return digest.hexdigest()


def _split_key(seed: int) -> bytes:
    return hashlib.sha256(f"batchscan train split {seed}".encode()).digest()


def from_scan_store(
    report_dir: Path, archive: Path, records: list[ImageRecord], keys: tuple[str, str]
) -> tuple[dict[str, tuple[ImageRecord, np.ndarray]], dict[str, ImageRecord]]:
    """What a scan into `report_dir` already knows of `records`, read-only and without
    opening the archive: for each file unchanged since (same size and mtime) whose row was
    made under the same (header key, input key) `keys` as this command's stages give, the
    scored ones with their 64 x 64 input from the scan's store, and the others (skipped or
    failed for good) as decided. Files the scan does not know this way are left out (they
    are read).

    Raises
    ------
    TrainingError
        If `report_dir` holds no scan state.
    """
    state = report_dir / STATE_FILE
    if not state.is_file():
        raise TrainingError(f"--from-scan {report_dir} holds no batchscan scan ({STATE_FILE})")
    pending = {state_key(r.path): r for r in records if r.pending}
    rows = {
        path: record
        for path, (record, stored_keys) in final_rows(
            state, list(pending), os.path.abspath(archive)
        ).items()
        if (record.size, record.mtime_ns) == (pending[path].size, pending[path].mtime_ns)
        and stored_keys.split(".")[:2] == list(keys)
    }
    scored = [(p, r.size, r.mtime_ns) for p, r in rows.items() if r.status == SCORED]
    store = InputStore(report_dir / STORE_FILE, readonly=True)
    try:
        inputs = store.get(scored, keys[1])
    finally:
        store.close()
    stored = {from_state(p): (rows[p], x[..., 0]) for p, x in inputs.items()}
    decided = {from_state(p): r for p, r in rows.items() if r.status != SCORED}
    return stored, decided


def collect(
    archive: Path,
    records: list[ImageRecord],
    fingerprint: str,
    labels: Labels,
    *,
    workers: int,
    pseudonym_key: bytes | None,
    seed: int,
    progress: bool = False,
    from_scan: Path | None = None,
) -> Examples:
    """Run the scan's stages over the `records` discovery found in `archive` (whose
    :func:`archive_fingerprint` is `fingerprint`) and keep the images of labelled studies;
    with `from_scan` (a scan's REPORT_DIR), the files that scan scored take their inputs
    from its model-input store instead (:func:`from_scan_store`), and only the others are
    read."""
    config = ScanConfig(
        archive=archive,
        out=archive,  # never written: only the stage options are used
        workers=workers,
        pseudonym_key=pseudonym_key or _split_key(seed),
    )
    # the scan's rows count only when made under this command's header options and key
    keys = (header_key(replace(config, pseudonym_key=pseudonym_key)), input_key(config))
    stored, decided = from_scan_store(from_scan, archive, records, keys) if from_scan else ({}, {})
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records) - len(stored) - len(decided), unit="file", desc="decode")
    chosen: list[tuple[ImageRecord, np.ndarray]] = []
    accounting: Counter[str] = Counter()
    for record in decided.values():
        accounting[f"not scored: {record.reason}"] += 1
    for record, x in stored.values():
        key = getattr(record, labels.key)
        if key is None or key not in labels.values:
            accounting["scored, no label"] += 1
        else:
            accounting["labelled example"] += 1
            accounting["labelled example from the scan's input store"] += 1
            chosen.append((record, x.astype(np.float32)))
    todo = [r for r in records if r.pending and r.path not in stored and r.path not in decided]
    for batch in prepared_stream(config, iter(todo), lambda n: None):
        inputs = dict(zip(batch.index.tolist(), batch.inputs, strict=True))
        for i, record in enumerate(batch.records):
            key = getattr(record, labels.key)
            if i not in inputs:
                accounting[f"not scored: {record.reason}"] += 1
            elif key is None or key not in labels.values:
                accounting["scored, no label"] += 1
            else:
                accounting["labelled example"] += 1
                chosen.append((record, inputs[i][..., 0].astype(np.float32)))
        if bar is not None:
            bar.update(len(batch.records))
    if bar is not None:
        bar.close()
    chosen.sort(key=lambda pair: pair[0].path)
    patients: dict[str, int] = {}
    group = []
    for record, _ in chosen:
        who = record.patient_key or f"study:{record.study_instance_uid}"
        group.append(patients.setdefault(who, len(patients)))
    return Examples(
        inputs=np.stack([x for _, x in chosen]) if chosen else np.zeros((0, 64, 64), np.float32),
        label=np.array([labels.values[getattr(r, labels.key)] for r, _ in chosen], np.int64),
        group=np.array(group, dtype=np.int64),
        study=[str(getattr(r, labels.key)) for r, _ in chosen],
        age=np.array(
            [np.nan if r.patient_age_years is None else r.patient_age_years for r, _ in chosen]
        ),
        view=[r.view or "unknown" for r, _ in chosen],
        modality=[r.modality or "unknown" for r, _ in chosen],
        manufacturer=[r.manufacturer or "unknown" for r, _ in chosen],
        fingerprint=fingerprint,
        files=len(records),
        accounting=dict(accounting),
    )


def _cache_key(examples_fingerprint: str, labels_sha: str, settings: dict[str, Any]) -> str:
    text = json.dumps([CACHE_VERSION, examples_fingerprint, labels_sha, settings], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save_cache(path: Path, examples: Examples, key: str) -> None:
    """Write the examples (no patient key: only group numbers) atomically."""
    with files.writing(path) as temporary, temporary.open("wb") as handle:
        np.savez(
            handle,
            key=np.array(key),
            inputs=examples.inputs,
            label=examples.label,
            group=examples.group,
            study=np.array(examples.study, dtype=str),
            age=examples.age,
            view=np.array(examples.view, dtype=str),
            modality=np.array(examples.modality, dtype=str),
            manufacturer=np.array(examples.manufacturer, dtype=str),
            fingerprint=np.array(examples.fingerprint),
            files=np.array(examples.files),
            accounting=np.array(json.dumps(examples.accounting)),
        )


def load_cache(path: Path, key: str) -> Examples | None:
    """The cached examples when `path` holds them under `key`, else None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return Examples(
                inputs=data["inputs"],
                label=data["label"],
                group=data["group"],
                study=data["study"].tolist(),
                age=data["age"],
                view=data["view"].tolist(),
                modality=data["modality"].tolist(),
                manufacturer=data["manufacturer"].tolist(),
                fingerprint=str(data["fingerprint"]),
                files=int(data["files"]),
                accounting=json.loads(str(data["accounting"])),
            )
    except (OSError, KeyError, ValueError):
        return None


def split_by_patient(
    examples: Examples,
    seed: int,
    shares: dict[str, float] | None = None,
) -> np.ndarray:
    """``train``/``val``/``test`` per image (or the parts of `shares`, by name and share of
    the studies, in order): patients shuffled with `seed` within their class and view and
    cut at :data:`SPLIT_SHARES` of the studies, so no patient is on two sides and each
    split has the archive's mix of views per class (a view that tracks the label tracks it
    alike in every split, and its test figure per view is not left to chance).

    Raises
    ------
    TrainingError
        Fewer than :data:`MIN_STUDIES_PER_CLASS` labelled studies of a class, or a split
        left without one of the classes.
    """
    studies = {s: int(y) for s, y in zip(examples.study, examples.label, strict=True)}
    per_class = Counter(studies.values())
    if min(per_class.get(0, 0), per_class.get(1, 0)) < MIN_STUDIES_PER_CLASS:
        raise TrainingError(
            f"too few labelled studies to split: {per_class.get(1, 0)} pneumonia and "
            f"{per_class.get(0, 0)} normal with a scorable image; need at least "
            f"{MIN_STUDIES_PER_CLASS} of each"
        )
    # stratified by patient: a patient's class is the majority of its studies' labels and
    # its view the most common of its images'; each (class, view) stratum's patients are
    # shuffled and cut at the shares of their studies, so every split gets both classes
    # (and each view's mix) whenever each stratum has a few patients
    rng = np.random.default_rng(seed)
    pairs = set(zip(examples.group.tolist(), examples.study, strict=True))
    studies_of: Counter[int] = Counter(g for g, _ in pairs)
    positives: Counter[int] = Counter(g for g, st in pairs if studies[st] == 1)
    views_of: dict[int, Counter[str]] = {}
    for g, v in zip(examples.group.tolist(), examples.view, strict=True):
        views_of.setdefault(g, Counter())[v] += 1
    stratum = {
        g: (
            int(positives[g] * 2 >= studies_of[g]),
            min(views_of[g], key=lambda v: (-views_of[g][v], v)),
        )
        for g in studies_of
    }
    parts = shares or dict(zip(("train", "val", "test"), SPLIT_SHARES, strict=True))
    names = list(parts)
    ends = np.cumsum(list(parts.values()))
    side: dict[int, str] = {}
    for key in sorted(set(stratum.values())):
        members = sorted(g for g in studies_of if stratum[g] == key)
        total = sum(studies_of[g] for g in members)
        done = 0
        for g in rng.permutation(np.array(members, dtype=np.int64)).tolist():
            at = int(np.searchsorted(ends * total, done, side="right"))
            side[g] = names[min(at, len(names) - 1)]
            done += studies_of[g]
    split = np.array([side[g] for g in examples.group.tolist()])
    for name in names:
        have = set(examples.label[split == name].tolist())
        if have != {0, 1}:
            raise TrainingError(
                f"the {name} split has no {'pneumonia' if 1 not in have else 'normal'} study "
                f"after the patient split ({per_class.get(1, 0)} pneumonia and "
                f"{per_class.get(0, 0)} normal studies); label more studies of that class"
            )
    return split


def balance_weights(labels: np.ndarray, views: list[str] | np.ndarray) -> np.ndarray:
    """Per-example weights under which every view carries the same class balance: an
    example of class c in view v weighs n_v / (2 n_{v,c}). The view then says nothing about
    the label (a model cannot gain by recognising it), and within each view the classes
    weigh alike, as class weighting does for the whole set. A view with one class only
    keeps weight 1 (there is no balance to restore in it)."""
    y = np.asarray(labels).astype(int)
    v = np.asarray(views, dtype=object)
    weights = np.ones(len(y), dtype=np.float64)
    for view in set(v.tolist()):
        mask = v == view
        counts = np.bincount(y[mask], minlength=2)
        if counts.min() == 0:
            continue
        for c in (0, 1):
            weights[mask & (y == c)] = mask.sum() / (2.0 * counts[c])
    return weights


def by_view(labels: np.ndarray, scores: np.ndarray, views: list[str]) -> dict[str, Any]:
    """The test figures per view (studies, pneumonia, AUC) and the AUC pooled within views:
    what the model is worth with the view held fixed."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    v = np.asarray(views, dtype=object)
    per_view = {}
    for view in sorted(set(v.tolist())):
        mask = v == view
        both = 0 < y[mask].sum() < mask.sum()
        per_view[view] = {
            "n": int(mask.sum()),
            "pneumonia": int(y[mask].sum()),
            "auc": metrics.roc_auc(y[mask], s[mask]) if both else None,
        }
    within, pairs = metrics.within_stratum_auc(y, s, v)
    return {"views": per_view, "within_view_auc": within, "within_view_pairs": pairs}


def domain_seen(examples: Examples, mask: np.ndarray, name: str) -> dict[str, Any]:
    """The training domain the card declares: what the training images actually were."""
    ages = examples.age[mask]
    known = ages[~np.isnan(ages)]
    views = sorted({v for v, m in zip(examples.view, mask, strict=True) if m} - {"unknown"})
    return {
        "age_years": [int(known.min()), int(known.max())] if len(known) else None,
        "age_groups": {
            "child": int((known < 18).sum()),
            "adult": int((known >= 18).sum()),
            "unknown": int(len(ages) - len(known)),
        },
        "modalities": sorted({m for m, k in zip(examples.modality, mask, strict=True) if k}),
        "views": views,
        "manufacturers": dict(
            Counter(m for m, k in zip(examples.manufacturer, mask, strict=True) if k)
        ),
        "population": f"labelled studies of the site archive {name} (training split)",
    }


@dataclass(frozen=True, slots=True)
class TrainRequest:
    """Everything ``batchscan train`` was asked."""

    archive: Path
    labels_path: Path
    labels: Labels
    out: Path
    name: str = "site_cnn"
    base: Path | None = None
    from_scratch: bool = False
    epochs: int | None = None
    batch_size: int = 64
    learning_rate: float | None = None
    patience: int = 8
    seed: int = 1234
    workers: int = 2
    cache: Path | None = None
    from_scan: Path | None = None
    pseudonym_key: bytes | None = None
    progress: bool = False
    augment: bool = True
    balance: str | None = None


@dataclass(slots=True)
class Collected:
    """The labelled examples and where they came from: the labels file's sha256, the cache
    file, and whether the examples were ``reused`` from it, ``written`` to it or read from
    the ``scan input store``."""

    examples: Examples
    labels_sha256: str
    cache: Path
    cache_state: str


def gather_examples(request: TrainRequest) -> Collected:
    """The examples of the archive's labelled studies: from the cache when it holds them
    under the same archive, labels and settings, else through the scan's stages
    (:func:`collect`), then kept in the cache (not with ``--from-scan``, whose input store
    is the cache)."""
    settings = {
        "spec": PREPROCESSING_SPEC["version"],
        "blank_rule": BLANK_RULE,
        "key": request.pseudonym_key is not None,
        "seed": request.seed if request.pseudonym_key is None else None,
        "labels_key": request.labels.key,
        # The same file gives other labels under another policy for its uncertain rows.
        "uncertain": request.labels.uncertain_policy,
    }
    labels_sha = hashlib.sha256(request.labels_path.read_bytes()).hexdigest()
    request.out.mkdir(parents=True, exist_ok=True)
    cache = request.cache or request.out / f"{request.name}.inputs.npz"
    records = list(iter_files(request.archive))
    fingerprint = archive_fingerprint(records)
    key = _cache_key(fingerprint, labels_sha, settings)
    # a scan's input store is the cache when there is one: the npz cache is for archives
    # no scan has read
    examples = None if request.from_scan else load_cache(cache, key)
    cache_state = "scan input store" if request.from_scan else "reused"
    if examples is None:
        examples = collect(
            request.archive,
            records,
            fingerprint,
            request.labels,
            workers=request.workers,
            pseudonym_key=request.pseudonym_key,
            seed=request.seed,
            progress=request.progress,
            from_scan=request.from_scan,
        )
        if request.from_scan is None:
            save_cache(cache, examples, key)
            cache_state = "written"
    return Collected(examples, labels_sha, cache, cache_state)


def _data_name(request: TrainRequest) -> str:
    """The training data's name in the card: the archive and the labels file."""
    return f"{request.archive.name} + {request.labels_path.name}"


def split_dataset(
    request: TrainRequest, collected: Collected, split: np.ndarray
) -> tuple[Any, dict[str, list[str]], dict[str, np.ndarray] | None]:
    """The examples by split as a :class:`batchscan.site.training.Dataset`, the views of
    each split, and the ``--balance view`` weights of train and val (None: class
    weighting)."""
    from batchscan.site.training import Dataset

    examples = collected.examples
    x = {
        s: np.repeat(examples.inputs[split == s][..., None], 3, axis=-1)
        for s in ("train", "val", "test")
    }
    y = {s: examples.label[split == s] for s in ("train", "val", "test")}
    views = {s: [v for v, k in zip(examples.view, split, strict=True) if k == s] for s in y}
    weights = (
        {s: balance_weights(y[s], views[s]) for s in ("train", "val")}
        if request.balance == "view"
        else None
    )
    dataset = Dataset(
        x=x,
        y=y,
        name=_data_name(request),
        sha256=collected.labels_sha256,
        source=str(request.archive),
    )
    return dataset, views, weights


def train_config(request: TrainRequest) -> Any:
    """The training run asked for: fine-tuning takes :data:`FINE_TUNE_EPOCHS` and
    :data:`FINE_TUNE_LEARNING_RATE`, ``--from-scratch`` the shipped model's own."""
    from batchscan.site.training import TrainConfig

    fine_tune = not request.from_scratch
    defaults = TrainConfig()
    return TrainConfig(
        epochs=request.epochs or (FINE_TUNE_EPOCHS if fine_tune else defaults.epochs),
        batch_size=request.batch_size,
        learning_rate=request.learning_rate
        or (FINE_TUNE_LEARNING_RATE if fine_tune else defaults.learning_rate),
        patience=request.patience,
        seed=request.seed,
        augment=request.augment,
        verbose=1 if request.progress else 2,
    )


def card_facts(
    request: TrainRequest,
    collected: Collected,
    split: np.ndarray,
    base_card: ModelCard,
    test_by_view: dict[str, Any],
) -> dict[str, Any]:
    """What the new model's card says beyond the training run: the domain the training
    images actually were, the archive and labels, the split by counts and seed, the base,
    the balance and the test figures per view."""
    examples = collected.examples
    studies = {
        s: {
            "images": int((split == s).sum()),
            "studies": len({st for st, k in zip(examples.study, split, strict=True) if k == s}),
            "patients": len(set(examples.group[split == s].tolist())),
            "pneumonia_images": int(examples.label[split == s].sum()),
            "normal_images": int((examples.label[split == s] == 0).sum()),
        }
        for s in ("train", "val", "test")
    }
    return {
        "intended_use": "Scores this site's frontal chest radiographs after local "
        "fine-tuning; measure with batchscan evaluate on studies it did not learn from.",
        "domain": domain_seen(examples, split == "train", request.archive.name),
        "training_data": {
            "name": _data_name(request),
            "labels_sha256": collected.labels_sha256,
            "uncertain_labels": {
                "rows": request.labels.uncertain,
                "policy": request.labels.uncertain_policy,
            },
            "archive_fingerprint": examples.fingerprint,
            "files_in_archive": examples.files,
            "accounting": examples.accounting,
            "splits": studies,
        },
        "split": {
            "unit": "patient (pseudonymised patient key)"
            if request.pseudonym_key is not None
            else "patient (HMAC of PatientID under a key derived from the seed, in memory "
            "only); a study without PatientID is its own patient"
            + (
                "; examples from the scan's input store (--from-scan) are grouped by that "
                "scan's patient key, or by study where it had no pseudonym key"
                if request.from_scan
                else ""
            ),
            "shares": list(SPLIT_SHARES),
            "seed": request.seed,
        },
        "base_model": None
        if request.from_scratch
        else {"version": base_card.version, "name": base_card.card.get("name")},
        "mode": "from_scratch" if request.from_scratch else "fine_tune",
        "balance": {
            "by": request.balance,
            "rule": "example of class c in view v weighs n_v / (2 n_v,c), in train and val"
            if request.balance == "view"
            else "class weighting over the whole training split",
        },
        "test_by_view": test_by_view,
        "limits": [
            "Not a medical device; not for diagnosis; every flag needs a radiologist's read.",
            "Learned from this site's labelled studies: its figures hold for studies like "
            "them (devices, population, period) and must be checked again when they change.",
            "Sees a 28 x 28 pixel picture (upsampled to 64 x 64): fine findings are invisible.",
            "Binary normal / pneumonia only; no other finding is detected, none is ruled out.",
        ],
    }


def run_training(request: TrainRequest) -> dict[str, Any]:
    """Collect (or reuse) the examples, split, train, write ``<name>.keras`` and its card.

    Returns
    -------
    dict
        The card, plus ``cache`` (``reused`` or ``written``) under ``_run``.
    """
    from batchscan.site.training import predict_scores, train, write_model

    base_card = check_model(request.base)
    collected = gather_examples(request)
    split = split_by_patient(collected.examples, request.seed)
    dataset, views, weights = split_dataset(request, collected, split)
    config = train_config(request)
    base = None if request.from_scratch else load_model(request.base).keras_model
    model, report = train(dataset, config, base=base, sample_weight=weights)
    scores = predict_scores(model, dataset.x["test"])
    facts = card_facts(
        request, collected, split, base_card, by_view(dataset.y["test"], scores, views["test"])
    )
    out_path = request.out / f"{request.name}.keras"
    card = write_model(model, report, dataset, config, out_path, "batchscan train", facts)
    card["_run"] = {"cache": collected.cache_state, "cache_path": str(collected.cache)}
    return card
