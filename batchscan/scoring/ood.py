"""Out-of-distribution score: how far the model's own view of an image lies from its training set.

The domain columns (:mod:`batchscan.ingest.domain`) judge an image by its header; a header can be
wrong, missing or silent about what matters (an inverted picture, a hand radiograph labelled
CHEST, a different detector). This score judges the picture by what the network made of it:
the activations of its penultimate layer (``dense``, 64 ReLU units), compared with those of
the training split by the Mahalanobis distance to the nearest class mean under a covariance
shared by the classes (Lee et al., "A Simple Unified Framework for Detecting
Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018). An image is ``ood``
when its distance exceeds the 99th percentile of the training images' own distances, so 1 %
of training-like images are marked by construction.

The statistics (class means, precision matrix, threshold) are fitted once, when the model is
trained (:func:`fit`), and stored beside the model as ``<stem>.ood.npz``; the model card names
the file, its sha256, the layer and the threshold (:func:`card_section`). This module is pure
numpy: the scoring stage (:mod:`batchscan.scoring.infer`) computes the activations and calls
:func:`distances`.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from batchscan.storage import files

#: The layer whose activations are compared (the seed CNN's penultimate Dense layer).
LAYER: Final = "dense"
#: Percentile of the training distances above which an image is ``ood``.
PERCENTILE: Final = 99.0
#: Ridge added to the shared covariance, as a fraction of its mean variance: ReLU units that
#: never fire on training images make the raw covariance singular.
SHRINKAGE: Final = 1e-3
METHOD: Final = (
    "Mahalanobis distance of the penultimate-layer activations to the nearest class mean, "
    "covariance shared by the classes (Lee et al., NeurIPS 2018), fitted on the train split"
)


@dataclass(frozen=True, slots=True)
class OodStatistics:
    """What :func:`distances` needs, fitted on the training split.

    Attributes
    ----------
    layer:
        Name of the layer whose activations are used.
    means:
        Class means of the activations, shape (classes, units).
    precision:
        Inverse of the shrunk shared covariance, shape (units, units).
    threshold:
        Distance above which an image is out of distribution (the training percentile).
    """

    layer: str
    means: np.ndarray
    precision: np.ndarray
    threshold: float


def fit(features: np.ndarray, labels: np.ndarray, layer: str = LAYER) -> OodStatistics:
    """Fit the statistics on training activations `features` (N, units) with their labels."""
    features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    labels = np.asarray(labels).reshape(-1)
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    covariance = centred.T @ centred / len(features)
    units = covariance.shape[0]
    ridge = SHRINKAGE * max(float(np.trace(covariance)) / units, 1e-12)
    precision = np.linalg.inv(covariance + ridge * np.eye(units))
    partial = OodStatistics(layer, means, precision, threshold=np.inf)
    threshold = float(np.percentile(distances(features, partial), PERCENTILE))
    return OodStatistics(layer, means, precision, threshold)


def distances(features: np.ndarray, stats: OodStatistics) -> np.ndarray:
    """Distance of each row of `features` (N, units) to the nearest class mean, float64 (N,)."""
    features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    best = np.full(len(features), np.inf)
    for mean in stats.means:
        centred = features - mean
        best = np.minimum(best, np.einsum("ij,jk,ik->i", centred, stats.precision, centred))
    return np.sqrt(np.maximum(best, 0.0))


def save(stats: OodStatistics, path: Path) -> str:
    """Write the statistics as npz (atomically); returns the file's sha256 (for the card)."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        layer=np.array(stats.layer),
        means=stats.means,
        precision=stats.precision,
        threshold=np.array(stats.threshold),
    )
    data = buffer.getvalue()
    files.write(path, data)
    return hashlib.sha256(data).hexdigest()


def card_section(stats: OodStatistics, path: Path, sha256: str, n_train: int) -> dict[str, Any]:
    """The card's ``ood`` entry naming the statistics file beside the model."""
    return {
        "method": METHOD,
        "layer": stats.layer,
        "file": path.name,
        "sha256": sha256,
        "threshold": stats.threshold,
        "threshold_rule": f"{PERCENTILE:g}th percentile of the train split's own distances",
        "shrinkage": SHRINKAGE,
        "computed_on": f"train split ({n_train} images), through batchscan.ingest.preprocess",
    }


def load(model_path: Path, card: dict[str, Any]) -> OodStatistics | None:
    """The statistics the card names (beside `model_path`), or None for a card without.

    Raises
    ------
    ValueError
        If the file is missing, differs from the card's sha256 or cannot be read.
    """
    section = card.get("ood")
    if not isinstance(section, dict):
        return None
    path = model_path.parent / str(section.get("file", ""))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"OOD statistics {path} named in the card: {exc.strerror}") from exc
    if hashlib.sha256(data).hexdigest() != section.get("sha256"):
        raise ValueError(f"OOD statistics {path} differ from the card's sha256")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return OodStatistics(
                layer=str(npz["layer"]),
                means=npz["means"].astype(np.float64),
                precision=npz["precision"].astype(np.float64),
                threshold=float(npz["threshold"]),
            )
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"cannot read OOD statistics {path}: {exc}") from exc
