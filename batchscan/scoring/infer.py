"""Batched inference: model inputs (N, 64, 64, 3) -> pneumonia scores (N,), float64, and
with them each image's out-of-distribution distance (:mod:`batchscan.scoring.ood`) when the model's
card names OOD statistics: the same forward pass also returns the penultimate layer.

Runs in the one process that holds the model. The forward pass is a ``tf.function``,
XLA-compiled by default (``jit_compile``), called on batches padded up to a power of two so
that only a handful of shapes are ever compiled (a new shape per tail batch would recompile
for every run). On a GPU the model runs in mixed precision (float16 compute, float32
output) unless ``precision="float32"`` is asked for.

TensorFlow is imported here lazily, so decode workers that import batchscan never load it.
"""

from __future__ import annotations

import contextlib
import platform
import time
from typing import Any, Literal

import numpy as np

from batchscan.ingest.preprocess import CHANNELS, INPUT_SIZE
from batchscan.ingest.records import Scores
from batchscan.scoring import ood
from batchscan.scoring.model import LoadedModel

Precision = Literal["auto", "float32", "mixed"]


def gpu_available() -> bool:
    """Whether TensorFlow sees a GPU."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def device_description() -> str:
    """The device the model runs on, as its maker names it: ``GPU (NVIDIA H200)`` from
    TensorFlow's device details, else ``CPU (AMD EPYC 7B13)`` from ``/proc/cpuinfo``. Two
    devices give scores that differ in float rounding (and by more in mixed precision), so
    every run records the one its scores came from (manifest.json, runs.parquet)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        name = details.get("device_name") or gpus[0].name
        return f"GPU ({name}{f' x{len(gpus)}' if len(gpus) > 1 else ''})"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        name = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
            name,
        )
    return f"CPU ({name})"


def _mixed_precision_copy(model: Any) -> Any:
    """The same network with float16 compute and a float32 last layer (for GPUs)."""
    import keras

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        last = layer.name == model.layers[-1].name
        config["dtype"] = "float32" if last else "mixed_float16"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def bucket_size(n: int, batch_size: int) -> int:
    """Padded size for a batch of `n` <= `batch_size`: the smallest power of two >= n (at
    least 8), but never more than `batch_size`."""
    size = 8
    while size < n:
        size *= 2
    return min(size, batch_size)


class Scorer:
    """Scores model inputs with one loaded model.

    Parameters
    ----------
    loaded:
        The model and its card (see :func:`batchscan.scoring.model.load_model`).
    batch_size:
        Largest batch sent to the device at once.
    jit_compile:
        XLA-compile the forward pass (on by default: it roughly doubles CPU throughput for
        this small CNN).
    precision:
        ``auto`` (mixed on a GPU, float32 on a CPU), ``float32`` or ``mixed``.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        batch_size: int = 256,
        *,
        jit_compile: bool = True,
        precision: Precision = "auto",
    ) -> None:
        import tensorflow as tf

        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        self.version = loaded.version
        use_mixed = precision == "mixed" or (precision == "auto" and gpu_available())
        model = _mixed_precision_copy(loaded.keras_model) if use_mixed else loaded.keras_model
        self.precision = "mixed" if use_mixed else "float32"
        #: ``CPU (model name)`` or ``GPU (name)``: :func:`device_description`.
        self.device = device_description()
        self.ood = loaded.ood
        if self.ood is not None:  # one pass gives the score and the layer OOD reads
            import keras

            layer = model.get_layer(self.ood.layer).output
            model = keras.Model(model.inputs, [model.layers[-1].output, layer])

        def forward(x: Any) -> Any:
            outputs = model(x, training=False)
            if self.ood is None:
                return tf.cast(outputs, tf.float32), tf.zeros((tf.shape(x)[0], 0), tf.float32)
            return tf.cast(outputs[0], tf.float32), tf.cast(outputs[1], tf.float32)

        self._forward = tf.function(forward, jit_compile=jit_compile, reduce_retracing=True)
        #: Seconds of the first call at each batch shape (tracing and XLA compiling, which
        #: a run pays once per shape whatever its size), for the manifest and benchmarks.
        self.compile_seconds = 0.0
        self._shapes: set[int] = set()

    def score(self, inputs: np.ndarray) -> np.ndarray:
        """Scores of `inputs` (N, 64, 64, 3) float32, as float64 (N,), in batches."""
        return self.score_ood(inputs).score

    def score_ood(self, inputs: np.ndarray) -> Scores:
        """Scores of `inputs` (N, 64, 64, 3) float32, as float64 (N,), with their OOD
        distances when the model has OOD statistics."""
        return self.score_features(inputs)[0]

    def features(self, inputs: np.ndarray) -> np.ndarray:
        """The activations of the layer the OOD check reads (the penultimate one), float32
        (N, units), from the same forward pass as the scores; (N, 0) for a model whose card
        names no OOD statistics. The drift monitor (:mod:`batchscan.site.drift`) compares
        them period by period."""
        return self.score_features(inputs)[1]

    def score_features(self, inputs: np.ndarray) -> tuple[Scores, np.ndarray]:
        """:meth:`score_ood` and :meth:`features` of `inputs`, from one forward pass."""
        threshold = self.ood.threshold if self.ood is not None else None
        if not len(inputs):
            self._check(inputs)
            empty = Scores(np.empty(0), np.empty(0) if threshold is not None else None, threshold)
            return empty, np.empty((0, 0), np.float32)
        out, features = self._forward_all(inputs)
        distances = ood.distances(features, self.ood) if self.ood is not None else None
        scores = Scores(np.clip(out, 0.0, 1.0), distances, threshold)
        return scores, features.astype(np.float32, copy=False)

    @staticmethod
    def _check(inputs: np.ndarray) -> None:
        if inputs.ndim != 4 or inputs.shape[1:] != (INPUT_SIZE, INPUT_SIZE, CHANNELS):
            raise ValueError(f"expected (N, 64, 64, 3) inputs, got {inputs.shape}")

    def _forward_all(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores (N,) and the penultimate layer (N, units; 0 units without OOD
        statistics) of `inputs`, in batches padded to a few shapes."""
        self._check(inputs)
        out = np.empty(len(inputs), dtype=np.float64)
        features: list[np.ndarray] = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            size = bucket_size(len(chunk), self.batch_size)
            if size != len(chunk):
                padded = np.zeros((size, *chunk.shape[1:]), dtype=np.float32)
                padded[: len(chunk)] = chunk
                chunk = padded
            started = time.perf_counter()
            scores, layer = self._forward(np.ascontiguousarray(chunk, np.float32))
            n = min(self.batch_size, len(inputs) - start)
            out[start : start + n] = scores.numpy().reshape(-1)[:n]
            features.append(layer.numpy()[:n])
            if size not in self._shapes:
                self._shapes.add(size)
                self.compile_seconds += time.perf_counter() - started
        return out, np.concatenate(features)
