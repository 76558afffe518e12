"""The levers of a site model that were measured and are not used, for the experiments that
measured them (jobs/experiments/adapt_levers.py, lung_evidence.py) and can measure them again
on a site's own data.

Why here and not in batchscan/: ``batchscan adapt`` ships what helped, and none of these did
(docs/site/adapt.md, "What helps a site model"):

* **fewer labelled studies** (:func:`draw_labelled`): the learning curve of adaptation;
* **an ensemble of seed CNNs** (:func:`build_ensemble`, :func:`merge_members`,
  :func:`train_ensemble`): K seed CNNs side by side in one chain of layers (``conv2``
  grouped, no weights between members), logits averaged, calibrated and thresholded as one
  model, so that the scan, its OOD check and its maps take it as they take one model;
* **border erasing** (:func:`erase_borders`): against the edge shortcut of the maps;
* **a kept pretraining** (:func:`pretrain_key`, :func:`load_pretrained`,
  :func:`save_pretrained`): not a lever but a saving, so that runs differing only in what
  they fine-tune on pretrain once.

:func:`adapt` is ``batchscan adapt`` (:func:`batchscan.site.adapt.run_adaptation`) step by
step, its own steps, with these levers in between.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from batchscan.ingest.preprocess import CHANNELS, INPUT_SIZE
from batchscan.scoring.model import build_seed_model, load_model
from batchscan.site import adapt as steps
from batchscan.site import metrics
from batchscan.site.report_labels import ReportLabeler
from batchscan.storage import files

#: Widest band :func:`erase_borders` covers on a side, as a share of the picture's side.
BORDER_BAND: Final = 0.2
#: Raised when what :func:`pretrain_key` covers changes.
PRETRAIN_CACHE_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class Levers:
    """What :func:`adapt` does beyond ``batchscan adapt``; the defaults do nothing."""

    #: Use at most this many labelled training-period studies, drawn with the seed.
    max_labelled: int | None = None
    #: Keep the pretrained backbone here (:func:`pretrain_key`); None: pretrain every time.
    pretrain_cache: Path | None = None
    #: Probability of erasing a training picture's borders (:func:`erase_borders`).
    erase_borders: float = 0.0
    #: Seed CNNs trained on the same split and averaged in one model; None: as many as the
    #: base holds (one, unless the base is an ensemble).
    ensemble: int | None = None


# -- fewer labelled studies ----------------------------------------------------------------


def draw_labelled(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """The images of at most `n` of the studies in `rows`, drawn with `seed`."""
    studies = np.sort(rows["study_instance_uid"].unique())
    if len(studies) <= n:
        return rows
    chosen = np.random.default_rng(seed).choice(studies, n, replace=False)
    return rows[rows["study_instance_uid"].isin(chosen)]


# -- an ensemble in one model file -------------------------------------------------------


def _widths() -> tuple[int, int, int]:
    """conv1 filters, conv2 filters and dense units of one seed CNN (from the product's
    builder, so that the two cannot drift apart)."""
    seed = build_seed_model()
    conv1, conv2, dense = (seed.get_layer(n) for n in ("conv1", "conv2", "dense"))
    return int(conv1.filters), int(conv2.filters), int(dense.units)


def build_ensemble(members: int) -> Any:
    """The seed architecture holding `members` seed CNNs side by side (untrained):
    ``conv1`` has the seed's filters per member, ``conv2`` is a grouped convolution (each
    member's filters see only its own channels), ``dense`` has the seed's units per member
    (weights between members stay zero once :func:`merge_members` fills it) and ``score``
    averages the members' logits. One chain of layers rather than k models: the scan, the
    OOD statistics (``dense``), calibration (``score``) and the maps (HiResCAM on the last
    Conv2D) all work on one chain, and then serve an ensemble unchanged."""
    import keras

    if members < 1:
        raise ValueError("members must be at least 1")
    k = members
    conv1, conv2, dense = _widths()
    return keras.Sequential(
        [
            keras.Input(shape=(INPUT_SIZE, INPUT_SIZE, CHANNELS), name="image"),
            keras.layers.Conv2D(conv1 * k, (3, 3), activation="relu", name="conv1"),
            keras.layers.MaxPooling2D((2, 2), name="pool1"),
            keras.layers.Conv2D(conv2 * k, (3, 3), activation="relu", groups=k, name="conv2"),
            keras.layers.MaxPooling2D((2, 2), name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(dense * k, activation="relu", name="dense"),
            keras.layers.Dense(1, activation="sigmoid", name="score"),
        ],
        name=f"pneumonia_cnn_seed_ensemble_{k}",
    )


def members_of(keras_model: Any) -> int:
    """How many seed CNNs a model of the seed architecture holds (1, or an ensemble's k).

    Raises
    ------
    ValueError
        If the model is not the seed architecture (or an ensemble of it).
    """
    try:
        filters = int(keras_model.get_layer("conv1").filters)
        groups = int(keras_model.get_layer("conv2").groups)
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"not the seed architecture: {exc}") from None
    conv1 = _widths()[0]
    if filters % conv1 or filters // conv1 != groups:
        raise ValueError(
            f"not the seed architecture: conv1 {filters} filters, conv2 {groups} groups"
        )
    return groups


def merge_members(models: list[Any]) -> Any:
    """One model (:func:`build_ensemble`) that gives exactly ``sigmoid(mean of the members'
    logits)`` of seed CNNs (each of :func:`members_of` 1); calibrate it afterwards as one
    model."""
    k = len(models)
    if k == 0:
        raise ValueError("no models to merge")
    if any(members_of(m) != 1 for m in models):
        raise ValueError("only single seed CNNs can be merged")
    _, width2, width_dense = _widths()
    merged = build_ensemble(k)
    weights = [{layer.name: layer.get_weights() for layer in m.layers} for m in models]
    conv1 = [np.concatenate([w["conv1"][i] for w in weights], axis=-1) for i in (0, 1)]
    conv2 = [np.concatenate([w["conv2"][i] for w in weights], axis=-1) for i in (0, 1)]
    # flatten orders (row, column, channel): member g's channels are g*64 ... g*64 + 63
    kernel = weights[0]["dense"][0]
    places = kernel.shape[0] // width2
    dense = np.zeros((places, width2 * k, width_dense * k), dtype=kernel.dtype)
    for g, w in enumerate(weights):
        rows = slice(g * width2, (g + 1) * width2)
        cols = slice(g * width_dense, (g + 1) * width_dense)
        dense[:, rows, cols] = w["dense"][0].reshape(places, width2, width_dense)
    dense_bias = np.concatenate([w["dense"][1] for w in weights])
    score = np.concatenate([w["score"][0] for w in weights], axis=0) / k
    score_bias = np.mean([w["score"][1] for w in weights], axis=0)
    merged.get_layer("conv1").set_weights(conv1)
    merged.get_layer("conv2").set_weights(conv2)
    merged.get_layer("dense").set_weights(
        [dense.reshape(places * width2 * k, width_dense * k), dense_bias]
    )
    merged.get_layer("score").set_weights([score, score_bias])
    return merged


def split_members(keras_model: Any) -> list[Any]:
    """The seed CNNs an ensemble holds (the model itself, rebuilt, when it holds one), each
    with its share of the last layer (its logit, before averaging, times one)."""
    k = members_of(keras_model)
    width1, width2, width_dense = _widths()
    w = {layer.name: layer.get_weights() for layer in keras_model.layers}
    places = w["dense"][0].shape[0] // (width2 * k)
    out = []
    for g in range(k):
        one = build_seed_model()
        c1 = slice(g * width1, (g + 1) * width1)
        c2 = slice(g * width2, (g + 1) * width2)
        d = slice(g * width_dense, (g + 1) * width_dense)
        one.get_layer("conv1").set_weights([w["conv1"][0][..., c1], w["conv1"][1][c1]])
        one.get_layer("conv2").set_weights([w["conv2"][0][..., c2], w["conv2"][1][c2]])
        dense = w["dense"][0].reshape(places, width2 * k, width_dense * k)[:, c2, d]
        one.get_layer("dense").set_weights(
            [np.ascontiguousarray(dense.reshape(places * width2, width_dense)), w["dense"][1][d]]
        )
        one.get_layer("score").set_weights([w["score"][0][d] * k, w["score"][1]])
        out.append(one)
    return out


def train_ensemble(
    dataset: Any,
    config: Any,
    members: int,
    base: Any = None,
    sample_weight: dict[str, np.ndarray] | None = None,
    more_augmentation: Callable[[Any], Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train `members` seed CNNs on the same split and average their logits in one model.

    Member ``i`` trains with seed ``config.seed + 1000 * i`` (member 0 is exactly what
    :func:`batchscan.site.training.train` makes with `config`) from `base`'s member ``i``
    modulo the base's members; the merged model is calibrated and given its threshold on
    val as one model. With ``members=1`` and a single base this is ``train``.

    Returns
    -------
    (keras.Model, dict)
        The calibrated model and a report as ``train``'s, with ``members`` (each member's
        seed, epochs, best epoch and val AUC).
    """
    from batchscan.site.training import calibrate, predict_scores, train

    if members < 1:
        raise ValueError("an ensemble needs at least one member")
    if members == 1 and (base is None or members_of(base) == 1):
        return train(dataset, config, base, sample_weight, more_augmentation)
    bases = split_members(base) if base is not None else [None]
    trained, reports = [], []
    for i in range(members):
        member_config = replace(config, seed=config.seed + 1000 * i)
        model, report = train(
            dataset, member_config, bases[i % len(bases)], sample_weight, more_augmentation
        )
        trained.append(model)
        reports.append({**report, "seed": member_config.seed})
    merged = merge_members(trained) if members > 1 else trained[0]
    x_val, y_val = dataset.x["val"], dataset.y["val"]
    report = {
        "epochs_run": max(r["epochs_run"] for r in reports),
        "best_epoch": [r["best_epoch"] for r in reports],
        "train_seconds": round(sum(r["train_seconds"] for r in reports), 1),
        "class_weight": reports[0]["class_weight"],
        "n_train": reports[0]["n_train"],
        "val_auc_history": reports[0]["val_auc_history"],
        "members": [
            {
                "seed": r["seed"],
                "epochs_run": r["epochs_run"],
                "best_epoch": r["best_epoch"],
                "val_auc": metrics.roc_auc(y_val, predict_scores(t, x_val)),
            }
            for r, t in zip(reports, trained, strict=True)
        ],
        **calibrate(merged, x_val, y_val),
    }
    return merged, report


def ensemble_facts(model: Any, report: dict[str, Any]) -> dict[str, Any]:
    """The card entries that say a model is an ensemble (none for one seed CNN)."""
    from batchscan.site.training import architecture_summary

    k = members_of(model)
    if k == 1:
        return {}
    return {
        "architecture": {
            "name": f"ensemble of {k} seed CNNs of the original design, side by side in one "
            "chain of layers (grouped conv2; weights between members are zero), logits "
            "averaged",
            "members": k,
            "layers": architecture_summary(model),
            "parameters": int(model.count_params()),
            "input_shape": [INPUT_SIZE, INPUT_SIZE, CHANNELS],
            "output": "sigmoid probability of pneumonia (Platt-calibrated on val)",
        },
        "ensemble": {
            "members": k,
            "what": "seed CNNs fine-tuned on the same split with seeds seed + 1000 i, "
            "logits averaged, calibrated and thresholded on val as one model",
            "runs": report.get("members"),
        },
    }


# -- border erasing ------------------------------------------------------------------------


def erase_borders(x: Any, probability: float, band: float = BORDER_BAND) -> Any:
    """A batch of model inputs (B, H, W, C) with, for each picture drawn with
    `probability`, a band of random width (0 to `band` of the side) along each of its four
    edges painted one random grey level.

    Why it was tried: the maps of the shipped model's flagged films lie mostly at the chest
    wall, the arms, the picture's edge and the burnt-in side marker, not in the lungs
    (docs/reports.md, "Where a score came from"). A model trained on pictures whose edges
    are sometimes replaced by a flat grey cannot rely on them. Measured
    (``jobs/experiments/lung_evidence.py``), it did not move the evidence into the lungs.
    """
    import tensorflow as tf

    shape = tf.shape(x)
    batch, height, width = shape[0], shape[1], shape[2]
    applied = tf.random.uniform((batch, 1, 1, 1)) < probability
    widths = tf.random.uniform((batch, 4), 0.0, band)  # left, right, top, bottom
    cols = tf.cast(tf.range(width), tf.float32)[None, :] / tf.cast(width, tf.float32)
    rows = tf.cast(tf.range(height), tf.float32)[None, :] / tf.cast(height, tf.float32)
    in_cols = (cols < widths[:, 0:1]) | (cols >= 1.0 - widths[:, 1:2])  # (B, W)
    in_rows = (rows < widths[:, 2:3]) | (rows >= 1.0 - widths[:, 3:4])  # (B, H)
    edge = in_rows[:, :, None, None] | in_cols[:, None, :, None]  # (B, H, W, 1)
    grey = tf.random.uniform((batch, 1, 1, 1))
    return tf.where(edge & applied, grey, x)


# -- a kept pretraining --------------------------------------------------------------------


def pretrain_key(period: pd.DataFrame, base_version: str, seed: int, views: int) -> str:
    """What makes a pretraining: the period's films (paths, sizes, mtimes), the base model,
    the seed and the views seen."""
    digest = hashlib.sha256(f"{PRETRAIN_CACHE_VERSION}\0{base_version}\0{seed}\0{views}".encode())
    for path, size, mtime in sorted(
        zip(period["path"].map(str), period["size"], period["mtime_ns"], strict=True)
    ):
        digest.update(f"\n{path}\0{size}\0{mtime}".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def load_pretrained(path: Path | None, key: str) -> Any:
    """The pretraining kept at `path` under `key`, or None (no file, another key, or a
    file that cannot be read: pretraining runs again)."""
    from batchscan.site.pretrain import BACKBONE_LAYERS, Pretrained

    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            facts = json.loads(str(data["facts"]))
            if facts.get("collapsed"):
                return Pretrained(None, facts)
            weights = {
                name: [data[f"{name}:{i}"] for i in range(int(data[f"{name}:n"]))]
                for name in BACKBONE_LAYERS
            }
            return Pretrained(weights, facts)
    except (OSError, KeyError, ValueError):
        return None


def save_pretrained(path: Path | None, key: str, pretrained: Any) -> None:
    """Keep `pretrained` at `path` under `key` (atomically; nothing when `path` is None)."""
    if path is None:
        return
    arrays: dict[str, Any] = {"key": np.array(key), "facts": np.array(json.dumps(pretrained.facts))}
    for name, weights in (pretrained.weights or {}).items():
        arrays[f"{name}:n"] = np.array(len(weights))
        arrays.update({f"{name}:{i}": w for i, w in enumerate(weights)})
    with files.writing(path) as temporary, temporary.open("wb") as handle:
        np.savez(handle, **arrays)


def kept_pretraining(
    request: steps.AdaptRequest, base: Any, base_version: str, films: Any, cache: Path | None
) -> Any:
    """``adapt``'s pretraining (:func:`batchscan.site.adapt.pretraining`), taken from
    `cache` when it holds this one (:func:`pretrain_key`), else run and kept there."""
    from batchscan.site.pretrain import DEFAULT_VIEWS

    views = request.pretrain_views or DEFAULT_VIEWS
    key = pretrain_key(films.images, base_version, request.seed, views)
    pretrained = load_pretrained(cache, key)
    if pretrained is None:
        pretrained = steps.pretraining(request, base, films)
        save_pretrained(cache, key, pretrained)
    return pretrained


# -- adapt with the levers -----------------------------------------------------------------


def adapt(
    request: steps.AdaptRequest,
    levers: Levers = Levers(),
    labeler: Callable[[], ReportLabeler] = ReportLabeler,
) -> steps.Adaptation:
    """``batchscan adapt``'s steps (:func:`batchscan.site.adapt.run_adaptation`), with
    `levers` in between; with the default levers its model and figures are the command's.

    Raises
    ------
    batchscan.site.adapt.AdaptError
        As ``run_adaptation``, and ``--pretrain`` from an ensemble base.
    """
    from batchscan.site.pretrain import with_backbone

    scan = steps.open_scan(request)
    labels, label_facts = steps.site_labels(request.report_dir, request.reports_file, labeler)
    selection = steps.select_rows(request, scan, labels)
    if levers.max_labelled is not None:
        selection.earlier = draw_labelled(selection.earlier, levers.max_labelled, request.seed)
    periods = steps.load_periods(request, scan, selection)
    base = load_model(scan.base.path).keras_model  # an ensemble base is taken here
    pretrained = None
    if request.pretrain:
        if members_of(base) > 1:
            raise steps.AdaptError(
                f"--pretrain starts from one seed CNN, and {scan.base.version} is an ensemble "
                f"of {members_of(base)}: give --base a single model"
            )
        pretrained = kept_pretraining(
            request, base, scan.base.version, periods.films, levers.pretrain_cache
        )
        base = with_backbone(base, pretrained)
    dataset, weights = steps.training_set(request, periods)
    config = steps.train_config(request)
    erase = (
        partial(erase_borders, probability=levers.erase_borders)
        if levers.erase_borders > 0
        else None
    )
    members = levers.ensemble or members_of(base)
    trained = train_ensemble(dataset, config, members, base, weights, erase)
    facts = ensemble_facts(*trained)
    if erase is not None:
        facts["border_erasing"] = {"probability": levers.erase_borders, "band": BORDER_BAND}
    card = steps.write_site_model(
        request, scan, periods, trained, dataset, config, pretrained, facts
    )
    return steps.report_adaptation(request, scan, periods, label_facts, trained[0], card)
