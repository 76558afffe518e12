"""Train the seed CNN, calibrate it, pick its threshold and write the model card.

Rules kept here, because the card's numbers are only honest if they hold:

* every image goes through :func:`batchscan.ingest.preprocess.preprocess`, as in the scan job;
* early stopping, model selection, calibration and the threshold use the **val** split only;
* the **test** split is scored once, after everything is fixed, for the card.

Calibration is Platt scaling (``sigmoid(a * z + c)`` on the logit z, fitted on val) folded
into the last Dense layer (kernel * a, bias * a + c), so the shipped file is still exactly the
seed architecture and its sigmoid output is already the calibrated probability.
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batchscan import __version__
from batchscan.ingest import sanity
from batchscan.ingest.preprocess import PREPROCESSING_SPEC, preprocess_many
from batchscan.scoring import ood
from batchscan.scoring.model import build_seed_model, check_seed_architecture, sha256_of
from batchscan.site import metrics as m
from batchscan.storage import files

SPLITS = ("train", "val", "test")
#: Environment variable naming the folder that holds the training data.
DATA_ENV = "BATCHSCAN_DATA"
NPZ_NAME = "pneumoniamnist_28_full.npz"
THRESHOLD_RULE = (
    "Youden's J on the calibrated val scores: the threshold maximising "
    "sensitivity + specificity - 1; positive when score >= threshold"
)
INTENDED_USE = (
    "Research and workflow triage: ranks and flags frontal chest radiographs of a DICOM "
    "archive by the probability of pneumonia, for review by radiologists."
)
#: The training domain the card declares (batchscan.ingest.domain judges every image against it):
#: PneumoniaMNIST comes from Kermany et al.'s anterior-posterior chest radiographs of
#: children aged one to five (Guangzhou Women and Children's Medical Center).
DOMAIN = {
    "age_years": [1, 5],
    "modalities": ["CR", "DX"],
    "views": ["AP"],
    "population": "Children aged 1-5 years, anterior-posterior chest radiographs, Guangzhou "
    "Women and Children's Medical Center (Kermany et al., Cell 2018), via PneumoniaMNIST",
}
LIMITS = [
    "Not a medical device; not for diagnosis; every flag needs a radiologist's read.",
    "Trained on PneumoniaMNIST: pediatric chest radiographs (Guangzhou, ages 1-5), "
    "so adult radiographs are out of its training distribution.",
    "Sees a 28 x 28 pixel picture (upsampled to 64 x 64): fine findings are invisible to it.",
    "Binary normal / pneumonia only; no other finding is detected, none is ruled out.",
    "The test split comes from another time than train/val; scores on local data may differ "
    "and the threshold should be checked against local outcomes before use.",
]


def default_npz_path(repository: Path) -> Path:
    """The PneumoniaMNIST npz: in $BATCHSCAN_DATA, else in ``../shared/data`` beside the
    repository (where it lies on every developer machine and in CI)."""
    folder = os.environ.get(DATA_ENV) or str(repository / ".." / "shared" / "data")
    return Path(folder) / NPZ_NAME


@dataclass(slots=True)
class Dataset:
    """Model inputs and labels by split, and where they came from."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    name: str
    sha256: str | None
    source: str


@dataclass(slots=True)
class TrainConfig:
    """Everything that decides a training run (recorded in the card)."""

    epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 1e-3
    patience: int = 12
    seed: int = 1234
    augment: bool = True
    class_weighting: bool = True
    max_train: int | None = None  # for quick tests: use only the first N shuffled images
    verbose: int | str = "auto"
    augmentation: dict[str, float] = field(
        default_factory=lambda: {
            "rotation_degrees": 10.0,
            "translation_fraction": 0.08,
            "zoom_fraction": 0.10,
            "contrast_factor": 0.20,
            "brightness_delta": 0.10,
        }
    )


def load_npz(path: Path) -> Dataset:
    """Load a PneumoniaMNIST-style npz (``train_images``/``train_labels``, val_, test_).

    Raises
    ------
    ValueError
        If a split's keys are missing or its arrays do not match.
    """
    with np.load(path) as data:
        x: dict[str, np.ndarray] = {}
        y: dict[str, np.ndarray] = {}
        for split in SPLITS:
            images_key, labels_key = f"{split}_images", f"{split}_labels"
            if images_key not in data or labels_key not in data:
                raise ValueError(f"{path} lacks {images_key} or {labels_key}")
            images, labels = data[images_key], data[labels_key].reshape(-1)
            if images.ndim != 3 or len(images) != len(labels):
                raise ValueError(f"{path}: {split} images {images.shape} vs labels {labels.shape}")
            x[split] = preprocess_many(images)
            y[split] = labels.astype(np.int64)
    return Dataset(x=x, y=y, name=path.name, sha256=sha256_of(path), source=str(path))


def read_image_file(path: Path) -> np.ndarray:
    """A display image from a DICOM file (the scan job's decode + normalize) or PNG/JPEG.

    Raises
    ------
    ValueError
        If the file is neither (or cannot be decoded).
    """
    from batchscan.ingest.dicom import DecodeError, read_display_image
    from batchscan.ingest.header import HEAD_BYTES, looks_like_dicom

    with open(path, "rb") as handle:
        head = handle.read(HEAD_BYTES)
    if looks_like_dicom(head) is not False:
        try:
            return read_display_image(str(path)).pixels
        except DecodeError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            return np.asarray(picture.convert("L"), dtype=np.float32) / 255.0
    except UnidentifiedImageError as exc:
        raise ValueError(f"{path}: neither DICOM nor an image Pillow reads") from exc


def load_folder(
    root: Path,
    read_display: Callable[[Path], np.ndarray] = read_image_file,
    *,
    seed: int = 1234,
) -> Dataset:
    """Load ``NORMAL/`` and ``PNEUMONIA/`` folders (optionally under ``train/ val/ test/``).

    Each file is turned into a display image by `read_display` (by default DICOM through the
    scan job's decode, PNG/JPEG through Pillow) and then preprocessed like any scan. Without
    split folders the files are split 80/10/10 within each class by a seeded shuffle.
    """

    def collect(folder: Path) -> tuple[list[Path], list[int]]:
        paths, labels = [], []
        for label, name in enumerate(("NORMAL", "PNEUMONIA")):
            sub = folder / name
            if sub.is_dir():
                files = sorted(p for p in sub.rglob("*") if p.is_file())
                paths += files
                labels += [label] * len(files)
        return paths, labels

    def to_inputs(paths: list[Path]) -> np.ndarray:
        return preprocess_many([read_display(p) for p in paths])

    x: dict[str, np.ndarray] = {}
    y: dict[str, np.ndarray] = {}
    if all((root / split).is_dir() for split in SPLITS):
        for split in SPLITS:
            paths, labels = collect(root / split)
            x[split], y[split] = to_inputs(paths), np.asarray(labels, dtype=np.int64)
    else:
        paths, labels = collect(root)
        by_label = [np.flatnonzero(np.asarray(labels) == c) for c in (0, 1)]
        if min(len(idx) for idx in by_label) < 5:
            raise ValueError(f"{root}: need at least 5 files in each of NORMAL/ and PNEUMONIA/")
        rng = np.random.default_rng(seed)
        parts: list[list[np.ndarray]] = [[], [], []]
        for idx in by_label:  # stratified: every split gets both classes
            idx = rng.permutation(idx)
            cut1, cut2 = int(0.8 * len(idx)), int(0.9 * len(idx))
            for part, piece in zip(parts, np.split(idx, [cut1, cut2]), strict=True):
                part.append(piece)
        for split, part in zip(SPLITS, parts, strict=True):
            idx = np.concatenate(part)
            x[split] = to_inputs([paths[i] for i in idx])
            y[split] = np.asarray([labels[i] for i in idx], dtype=np.int64)
    return Dataset(x=x, y=y, name=root.name, sha256=None, source=str(root))


def _augmenter(config: TrainConfig) -> Any:
    """Augmentation suited to radiographs: small rotations, shifts, zoom, exposure changes.

    No flips: a mirrored chest (heart on the right) is not a picture the job will meet.
    """
    import keras

    a = config.augmentation
    return keras.Sequential(
        [
            keras.layers.RandomRotation(a["rotation_degrees"] / 360.0, fill_mode="nearest"),
            keras.layers.RandomTranslation(
                a["translation_fraction"], a["translation_fraction"], fill_mode="nearest"
            ),
            keras.layers.RandomZoom(a["zoom_fraction"], fill_mode="nearest"),
            keras.layers.RandomContrast(a["contrast_factor"], value_range=(0.0, 1.0)),
            keras.layers.RandomBrightness(a["brightness_delta"], value_range=(0.0, 1.0)),
        ],
        name="augment",
    )


def logits_of(model: Any, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Pre-sigmoid outputs of the seed model (the last Dense layer without its activation)."""
    import keras

    hidden = keras.Model(model.inputs, model.get_layer("dense").output)
    h = hidden.predict(x, batch_size=batch_size, verbose=0)
    kernel, bias = model.get_layer("score").get_weights()
    return (h @ kernel + bias).reshape(-1).astype(np.float64)


def fold_calibration(model: Any, scale: float, shift: float) -> None:
    """Make the last layer compute ``sigmoid(scale * z + shift)`` instead of ``sigmoid(z)``."""
    layer = model.get_layer("score")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * scale, bias * scale + shift])


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    return np.exp(-np.logaddexp(0.0, -z))


def train(
    dataset: Dataset,
    config: TrainConfig,
    base: Any = None,
    sample_weight: dict[str, np.ndarray] | None = None,
    more_augmentation: Callable[[Any], Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train, select on val, calibrate on val, pick the threshold on val.

    With `base` (a Keras model of the seed architecture) training starts from its weights
    (fine-tuning, as ``batchscan train`` does by default); otherwise from scratch. With
    `sample_weight` (``train`` and ``val`` arrays, e.g. ``batchscan train --balance view``)
    each example of the loss and of the validation AUC that early stopping follows counts
    by its weight, instead of class weighting. `more_augmentation` maps each training batch
    of pictures (B, 64, 64, 3) after the augmentation: the commands pass none; the jobs
    that measure other augmentations pass theirs (``jobs/common/levers.py``).

    Raises
    ------
    batchscan.scoring.model.ModelError
        `base` is not the seed architecture.

    Returns
    -------
    (keras.Model, dict)
        The calibrated model and a report (history, calibration, threshold, val metrics).
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()

    x_train, y_train = dataset.x["train"], dataset.y["train"]
    order = np.random.default_rng(config.seed).permutation(len(x_train))
    if config.max_train is not None:
        order = order[: config.max_train]
    x_train, y_train = x_train[order], y_train[order]
    x_val, y_val = dataset.x["val"], dataset.y["val"]
    w_train = sample_weight["train"][order].astype(np.float32) if sample_weight else None

    class_weight = None
    if config.class_weighting and sample_weight is None:
        n = len(y_train)
        counts = np.bincount(y_train, minlength=2)
        class_weight = {c: float(n / (2.0 * max(counts[c], 1))) for c in (0, 1)}

    columns: tuple[np.ndarray, ...] = (x_train, y_train.astype(np.float32))
    if w_train is not None:
        columns = (*columns, w_train)
    train_ds = tf.data.Dataset.from_tensor_slices(columns)
    train_ds = train_ds.shuffle(len(x_train), seed=config.seed, reshuffle_each_iteration=True)
    train_ds = train_ds.batch(config.batch_size)
    if config.augment:
        augment = _augmenter(config)
        train_ds = train_ds.map(
            lambda x, *rest: (tf.clip_by_value(augment(x, training=True), 0.0, 1.0), *rest),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    if more_augmentation is not None:
        train_ds = train_ds.map(
            lambda x, *rest: (more_augmentation(x), *rest),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    train_ds = train_ds.prefetch(tf.data.AUTOTUNE)

    model = build_seed_model()
    if base is not None:
        check_seed_architecture(base)
        model.set_weights(base.get_weights())
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc", num_thresholds=1000), "accuracy"],
    )
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_auc", mode="max", patience=config.patience, restore_best_weights=True
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_auc", mode="max", factor=0.5, patience=max(config.patience // 3, 1)
        ),
    ]
    started = time.perf_counter()
    with warnings.catch_warnings():
        # Keras says the tf.data pipeline ignores shuffle=True: it is shuffled above
        warnings.filterwarnings("ignore", message=".*shuffle=True.*", category=UserWarning)
        history = model.fit(
            train_ds,
            validation_data=(x_val, y_val.astype(np.float32))
            if sample_weight is None
            else (x_val, y_val.astype(np.float32), sample_weight["val"].astype(np.float32)),
            epochs=config.epochs,
            class_weight=class_weight,
            callbacks=callbacks,
            verbose=config.verbose,
        )
    seconds = time.perf_counter() - started
    val_auc_history = [float(v) for v in history.history["val_auc"]]
    best_epoch = int(np.argmax(val_auc_history)) + 1

    report = {
        "epochs_run": len(val_auc_history),
        "best_epoch": best_epoch,
        "train_seconds": round(seconds, 1),
        "class_weight": class_weight,
        "n_train": len(x_train),
        "val_auc_history": [round(v, 4) for v in val_auc_history],
        **calibrate(model, x_val, y_val),
    }
    return model, report


def calibrate(model: Any, x_val: np.ndarray, y_val: np.ndarray) -> dict[str, Any]:
    """Fit Platt scaling on val, fold it into `model`'s last layer, choose the threshold
    (Youden's J on val); returns the report's calibration entries and ``threshold``."""
    val_logits = logits_of(model, x_val)
    scale, shift = m.fit_platt(y_val, val_logits)
    if scale <= 0:  # would invert the ranking: keep the raw scores
        scale, shift = 1.0, 0.0
    ece_before = m.expected_calibration_error(y_val, sigmoid(val_logits))
    fold_calibration(model, scale, shift)
    val_scores = predict_scores(model, x_val)
    return {
        "platt_scale": scale,
        "platt_shift": shift,
        "val_ece_before_calibration": ece_before,
        "val_ece_after_calibration": m.expected_calibration_error(y_val, val_scores),
        "threshold": m.youden_threshold(y_val, val_scores),
    }


def sanity_bound(inputs: np.ndarray) -> dict[str, Any]:
    """The card's ``sanity`` entry: the blank-image rule (:mod:`batchscan.ingest.sanity`, the same
    for every model) and how far this model's training pictures lie from it."""
    return sanity.describe(
        inputs, f"train split ({len(inputs)} images), through batchscan.ingest.preprocess"
    )


def layer_features(model: Any, x: np.ndarray, layer: str, batch_size: int = 512) -> np.ndarray:
    """The activations of `layer` for model inputs `x`, float64 (N, units)."""
    import keras

    features = keras.Model(model.inputs, model.get_layer(layer).output)
    return features.predict(x, batch_size=batch_size, verbose=0).reshape(len(x), -1)


def write_ood_statistics(
    model: Any, x_train: np.ndarray, y_train: np.ndarray, model_path: Path
) -> dict[str, Any]:
    """Fit the OOD statistics (:mod:`batchscan.scoring.ood`) on the train split, write them beside
    `model_path` as ``<stem>.ood.npz`` and return the card's ``ood`` entry."""
    stats = ood.fit(layer_features(model, x_train, ood.LAYER), y_train)
    path = model_path.with_suffix(".ood.npz")
    return ood.card_section(stats, path, ood.save(stats, path), len(x_train))


def predict_scores(model: Any, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Model scores as float64, shape (N,)."""
    return model.predict(x, batch_size=batch_size, verbose=0).reshape(-1).astype(np.float64)


def architecture_summary(model: Any) -> list[dict[str, Any]]:
    """One entry per layer: name, class, output shape and parameter count."""
    return [
        {
            "name": layer.name,
            "class": type(layer).__name__,
            "output_shape": list(layer.output.shape)[1:],
            "params": int(layer.count_params()),
        }
        for layer in model.layers
    ]


def write_model(
    model: Any,
    report: dict[str, Any],
    dataset: Dataset,
    config: TrainConfig,
    out_path: Path,
    command: str | None = None,
    card_facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save `model` as `out_path` (.keras), score val and test once, write the card beside it.

    `card_facts` replace or add card entries (``batchscan train`` states the domain it saw,
    its base model, split and archive instead of PneumoniaMNIST's).

    Returns
    -------
    dict
        The card.
    """
    import keras
    import tensorflow as tf

    out_path.parent.mkdir(parents=True, exist_ok=True)
    # rebuilt from its own layers, uncompiled: the file carries weights only
    shipped = keras.Sequential.from_config(model.get_config())
    shipped.set_weights(model.get_weights())
    with files.writing(out_path, suffix=out_path.suffix) as temporary:  # Keras wants .keras
        shipped.save(temporary)
    model = shipped
    threshold = float(report["threshold"])
    card_metrics: dict[str, Any] = {}
    for split in ("val", "test"):
        scores = predict_scores(model, dataset.x[split])
        card_metrics.update(
            m.split_metrics(dataset.y[split], scores, threshold, seed=config.seed).as_dict(split)
        )
    card = {
        "name": out_path.stem,
        "model_file": out_path.name,
        "model_sha256": sha256_of(out_path),
        "architecture": {
            "name": "seed CNN of the original design",
            "layers": architecture_summary(model),
            "parameters": int(model.count_params()),
            "input_shape": [64, 64, 3],
            "output": "sigmoid probability of pneumonia (Platt-calibrated on val)",
        },
        "preprocessing": PREPROCESSING_SPEC,
        "training_data": {
            "name": dataset.name,
            "sha256": dataset.sha256,
            "splits": {
                s: {"n": len(dataset.y[s]), "positive": int(dataset.y[s].sum())} for s in SPLITS
            },
        },
        "training": {
            "optimizer": f"Adam(learning_rate={config.learning_rate})",
            "loss": "binary_crossentropy",
            "batch_size": config.batch_size,
            "epochs_max": config.epochs,
            "early_stopping": f"val AUC, patience {config.patience}, best weights restored",
            "augmentation": config.augmentation if config.augment else None,
            "class_weighting": report["class_weight"],
            "seed": config.seed,
            "command": command,
            **{k: report[k] for k in ("epochs_run", "best_epoch", "train_seconds", "n_train")},
        },
        "calibration": {
            "method": "Platt scaling sigmoid(a * logit + c) fitted on val, folded into the "
            "last Dense layer",
            "a": report["platt_scale"],
            "c": report["platt_shift"],
            "val_ece_before": report["val_ece_before_calibration"],
            "val_ece_after": report["val_ece_after_calibration"],
        },
        "threshold": threshold,
        "threshold_rule": THRESHOLD_RULE,
        "sanity": sanity_bound(dataset.x["train"]),
        "ood": write_ood_statistics(model, dataset.x["train"], dataset.y["train"], out_path),
        "metrics": card_metrics,
        **{
            k: card_metrics[k]
            for k in ("test_auc", "test_accuracy", "test_sensitivity", "test_specificity")
        },
        "software": {
            "batchscan": __version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
        },
        "intended_use": INTENDED_USE,
        "domain": DOMAIN,
        "limits": LIMITS,
        **(card_facts or {}),
    }
    files.write(out_path.with_suffix(".json"), json.dumps(card, indent=2) + "\n")
    return card
