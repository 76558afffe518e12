"""The pneumonia CNN: its architecture, its model card, and loading a shipped model safely.

A model file is only usable together with its card (same stem, ``.json``): the card says
which preprocessing the model was trained with, at which threshold a study is flagged and
how well it did on held-out data. Loading refuses a model without a card, with a card whose
preprocessing this code does not implement, or whose bytes do not match the card's sha256,
because each of those would silently produce wrong scores.

This module imports TensorFlow; decode workers never import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

from batchscan.ingest.preprocess import CHANNELS, INPUT_SIZE, spec_is_supported
from batchscan.scoring import ood
from batchscan.scoring.ood import OodStatistics

#: Stem of the model shipped inside the package and used when ``--model`` is not given.
DEFAULT_MODEL_NAME: Final = "pneumonia_cnn_seed"

#: Keys a card must hold (docs/model.md, "The model file and its card").
REQUIRED_CARD_KEYS: Final = (
    "preprocessing",
    "threshold",
    "threshold_rule",
    "training_data",
    "metrics",
)


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block (Python exceptions still raise).

    TensorFlow's C++ layer prints start-up lines (oneDNN, CUDA probing) straight to fd 2,
    ignoring TF_CPP_MIN_LOG_LEVEL; from cron each run would mail them. They are hidden while
    TensorFlow is imported and its devices are listed, and only then.
    """
    if os.environ.get("BATCHSCAN_TF_LOGS"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_keras() -> Any:
    """Import Keras (and TensorFlow) quietly, and list devices once so CUDA probing is done."""
    with native_stderr_silenced():
        import keras
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
    return keras


class ModelError(ValueError):
    """A model file or its card is missing, inconsistent or not supported by this code."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A Keras model with its card, ready for inference.

    Attributes
    ----------
    keras_model:
        The compiled-free Keras model (inference only).
    card:
        The parsed model card.
    path:
        Where the ``.keras`` file was read from.
    version:
        ``<stem>-<first 12 hex digits of sha256>``: identifies the exact file in reports.
    threshold:
        Operating threshold on the (calibrated) score; a study at or above it is flagged.
    ood:
        The out-of-distribution statistics the card names (:mod:`batchscan.scoring.ood`), or None.
    """

    keras_model: Any
    card: dict[str, Any]
    path: Path
    version: str
    threshold: float
    ood: OodStatistics | None = None


def build_seed_model() -> Any:
    """Build the seed architecture of the original design (untrained).

    Conv2D(32, 3x3, relu) -> MaxPool(2) -> Conv2D(64, 3x3, relu) -> MaxPool(2) -> Flatten ->
    Dense(64, relu) -> Dense(1, sigmoid), input 64 x 64 x 3.
    """
    import keras

    return keras.Sequential(
        [
            keras.Input(shape=(INPUT_SIZE, INPUT_SIZE, CHANNELS), name="image"),
            keras.layers.Conv2D(32, (3, 3), activation="relu", name="conv1"),
            keras.layers.MaxPooling2D((2, 2), name="pool1"),
            keras.layers.Conv2D(64, (3, 3), activation="relu", name="conv2"),
            keras.layers.MaxPooling2D((2, 2), name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(64, activation="relu", name="dense"),
            keras.layers.Dense(1, activation="sigmoid", name="score"),
        ],
        name="pneumonia_cnn_seed",
    )


def check_seed_architecture(keras_model: Any) -> None:
    """Refuse a model whose layers are not those of :func:`build_seed_model` (by name and
    weight shapes): training, pretraining and calibration set and read its layers by name.

    Raises
    ------
    ModelError
        Naming the first layer that differs.
    """
    expected = {
        layer.name: [tuple(w.shape) for w in layer.get_weights()]
        for layer in build_seed_model().layers
    }
    for name, shapes in expected.items():
        try:
            found = [tuple(w.shape) for w in keras_model.get_layer(name).get_weights()]
        except (ValueError, AttributeError):
            raise ModelError(f"not the seed architecture: no layer {name!r}") from None
        if found != shapes:
            raise ModelError(
                f"not the seed architecture: layer {name!r} has weights {found}, not {shapes}"
            )


def sha256_of(path: Path) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card_path_for(model_path: Path) -> Path:
    """The card that belongs to `model_path`: same folder, same stem, ``.json``."""
    return model_path.with_suffix(".json")


def default_model_path() -> Path:
    """Path of the model shipped inside the package."""
    return Path(str(resources.files("batchscan.models").joinpath(f"{DEFAULT_MODEL_NAME}.keras")))


def read_card(model_path: Path) -> dict[str, Any]:
    """Read and check the card of `model_path` without loading TensorFlow.

    Parameters
    ----------
    model_path:
        A ``.keras`` file.

    Returns
    -------
    dict
        The card.

    Raises
    ------
    ModelError
        If the model or card is missing or unreadable, a required key is absent, the
        preprocessing spec is not the one this code implements, or the sha256 recorded in
        the card does not match the file.
    """
    if not model_path.is_file():
        raise ModelError(f"model file not found: {model_path}")
    card_file = card_path_for(model_path)
    if not card_file.is_file():
        raise ModelError(f"model card missing: expected {card_file} beside {model_path.name}")
    try:
        card = json.loads(card_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"model card {card_file} is not readable JSON: {exc}") from exc
    if not isinstance(card, dict):
        raise ModelError(f"model card {card_file} is not a JSON object")
    missing = [key for key in REQUIRED_CARD_KEYS if key not in card]
    if missing:
        raise ModelError(f"model card {card_file} lacks {', '.join(missing)}")
    if not spec_is_supported(card["preprocessing"]):
        spec = card["preprocessing"]
        name = spec.get("name") if isinstance(spec, dict) else spec
        version = spec.get("version") if isinstance(spec, dict) else None
        raise ModelError(
            f"model card {card_file} asks for preprocessing {name!r} version {version!r}, "
            "which this batchscan does not implement"
        )
    recorded = card.get("model_sha256")
    if recorded is not None and recorded != sha256_of(model_path):
        raise ModelError(f"{model_path.name} does not match the sha256 in its card {card_file}")
    threshold = card["threshold"]
    if not isinstance(threshold, int | float) or not 0.0 <= float(threshold) <= 1.0:
        raise ModelError(f"model card {card_file} has an invalid threshold {threshold!r}")
    return card


def model_version(model_path: Path, sha256: str | None = None) -> str:
    """``<stem>-<sha256[:12]>``: names the exact model file in every report row (`sha256`:
    the file's digest when already known, so the file is not hashed again)."""
    return f"{model_path.stem}-{(sha256 or sha256_of(model_path))[:12]}"


@dataclass(frozen=True, slots=True)
class ModelCard:
    """A model file checked against its card, without loading TensorFlow.

    A run whose archive has nothing new needs the version (to know what is still valid) and
    the threshold, but never the network: it does not pay TensorFlow's start-up.
    """

    card: dict[str, Any]
    path: Path
    version: str
    threshold: float
    ood: OodStatistics | None = None


def check_model(model_path: Path | None = None) -> ModelCard:
    """Check a model file and its card (see :func:`read_card`) without loading it.

    Raises
    ------
    ModelError
        As :func:`read_card`.
    """
    path = Path(model_path) if model_path is not None else default_model_path()
    card = read_card(path)  # checks the card's model_sha256 against the file, when present
    version = model_version(path, card.get("model_sha256"))
    try:
        statistics = ood.load(path, card)
    except ValueError as exc:
        raise ModelError(str(exc)) from exc
    return ModelCard(
        card=card,
        path=path,
        version=version,
        threshold=float(card["threshold"]),
        ood=statistics,
    )


def load_model(model_path: Path | None = None) -> LoadedModel:
    """Load a model and its card for inference.

    Parameters
    ----------
    model_path:
        A ``.keras`` file; None means the model shipped in the package.

    Returns
    -------
    LoadedModel

    Raises
    ------
    ModelError
        As :func:`read_card`, or when Keras cannot read the file or the model's input is not
        64 x 64 x 3.
    """
    checked = check_model(model_path)
    path, card = checked.path, checked.card
    keras = import_keras()
    try:
        keras_model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a corrupt or foreign file
        raise ModelError(f"cannot load model {path}: {type(exc).__name__}: {exc}") from exc
    expected = (None, INPUT_SIZE, INPUT_SIZE, CHANNELS)
    if tuple(keras_model.input_shape) != expected:
        raise ModelError(f"model {path} takes input {keras_model.input_shape}, not {expected}")
    return LoadedModel(
        keras_model=keras_model,
        card=card,
        path=path,
        version=checked.version,
        threshold=checked.threshold,
        ood=checked.ood,
    )
