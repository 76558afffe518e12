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

#: Keys a card must hold (see docs/interface.md of the project).
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


#: Units of the seed architecture's layers that an ensemble widens (one block per member).
_CONV1: Final = 32
_CONV2: Final = 64
_DENSE: Final = 64


def build_seed_model(members: int = 1) -> Any:
    """Build the seed architecture of the original design (untrained).

    Conv2D(32, 3x3, relu) -> MaxPool(2) -> Conv2D(64, 3x3, relu) -> MaxPool(2) -> Flatten ->
    Dense(64, relu) -> Dense(1, sigmoid), input 64 x 64 x 3.

    With ``members`` > 1 the same chain of layers holds that many seed CNNs side by side
    (:func:`merge_members` fills it): ``conv1`` has 32 filters per member, ``conv2`` is a
    grouped convolution (each member's 64 filters see only its own 32 channels), ``dense``
    has 64 units per member (weights between members stay zero) and ``score`` averages the
    members' logits. Why one chain rather than k models: the scan, the OOD statistics
    (``dense``), calibration (``score``) and the maps (HiResCAM on the last Conv2D) all work
    on one chain of layers, and then serve an ensemble unchanged.
    """
    import keras

    if members < 1:
        raise ValueError("members must be at least 1")
    k = members
    return keras.Sequential(
        [
            keras.Input(shape=(INPUT_SIZE, INPUT_SIZE, CHANNELS), name="image"),
            keras.layers.Conv2D(_CONV1 * k, (3, 3), activation="relu", name="conv1"),
            keras.layers.MaxPooling2D((2, 2), name="pool1"),
            keras.layers.Conv2D(_CONV2 * k, (3, 3), activation="relu", groups=k, name="conv2"),
            keras.layers.MaxPooling2D((2, 2), name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(_DENSE * k, activation="relu", name="dense"),
            keras.layers.Dense(1, activation="sigmoid", name="score"),
        ],
        name="pneumonia_cnn_seed" if k == 1 else f"pneumonia_cnn_seed_ensemble_{k}",
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
    if filters % _CONV1 or filters // _CONV1 != groups:
        raise ValueError(
            f"not the seed architecture: conv1 {filters} filters, conv2 {groups} groups"
        )
    return groups


def merge_members(models: list[Any]) -> Any:
    """One model that averages the logits of seed CNNs (each of ``members_of`` 1).

    The result, of :func:`build_seed_model` with ``members=len(models)``, gives exactly
    ``sigmoid(mean of the members' logits)``; calibrate it afterwards as one model.
    """
    import numpy as np

    k = len(models)
    if k == 0:
        raise ValueError("no models to merge")
    if any(members_of(m) != 1 for m in models):
        raise ValueError("only single seed CNNs can be merged")
    merged = build_seed_model(k)
    weights = [{layer.name: layer.get_weights() for layer in m.layers} for m in models]
    conv1 = [np.concatenate([w["conv1"][i] for w in weights], axis=-1) for i in (0, 1)]
    conv2 = [np.concatenate([w["conv2"][i] for w in weights], axis=-1) for i in (0, 1)]
    # flatten orders (row, column, channel): member g's channels are g*64 ... g*64 + 63
    kernel = weights[0]["dense"][0]
    places = kernel.shape[0] // _CONV2
    dense = np.zeros((places, _CONV2 * k, _DENSE * k), dtype=kernel.dtype)
    for g, w in enumerate(weights):
        rows, cols = slice(g * _CONV2, (g + 1) * _CONV2), slice(g * _DENSE, (g + 1) * _DENSE)
        dense[:, rows, cols] = w["dense"][0].reshape(places, _CONV2, _DENSE)
    dense_bias = np.concatenate([w["dense"][1] for w in weights])
    score = np.concatenate([w["score"][0] for w in weights], axis=0) / k
    score_bias = np.mean([w["score"][1] for w in weights], axis=0)
    merged.get_layer("conv1").set_weights(conv1)
    merged.get_layer("conv2").set_weights(conv2)
    merged.get_layer("dense").set_weights(
        [dense.reshape(places * _CONV2 * k, _DENSE * k), dense_bias]
    )
    merged.get_layer("score").set_weights([score, score_bias])
    return merged


def split_members(keras_model: Any) -> list[Any]:
    """The seed CNNs an ensemble holds (the model itself, rebuilt, when it holds one), each
    with its share of the last layer (its logit, before averaging, times one)."""
    import numpy as np

    k = members_of(keras_model)
    w = {layer.name: layer.get_weights() for layer in keras_model.layers}
    places = w["dense"][0].shape[0] // (_CONV2 * k)
    out = []
    for g in range(k):
        one = build_seed_model()
        c1 = slice(g * _CONV1, (g + 1) * _CONV1)
        c2 = slice(g * _CONV2, (g + 1) * _CONV2)
        d = slice(g * _DENSE, (g + 1) * _DENSE)
        one.get_layer("conv1").set_weights([w["conv1"][0][..., c1], w["conv1"][1][c1]])
        one.get_layer("conv2").set_weights([w["conv2"][0][..., c2], w["conv2"][1][c2]])
        dense = w["dense"][0].reshape(places, _CONV2 * k, _DENSE * k)[:, c2, d]
        one.get_layer("dense").set_weights(
            [np.ascontiguousarray(dense.reshape(places * _CONV2, _DENSE)), w["dense"][1][d]]
        )
        one.get_layer("score").set_weights([w["score"][0][d] * k, w["score"][1]])
        out.append(one)
    return out


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
