"""Self-supervised pretraining of the seed CNN on a site's unlabelled model inputs (SimSiam).

Why: a site labels a few hundred or thousand studies from its reports, but its model-input
store (:mod:`batchscan.scoring.input_store`) holds the 64 x 64 input of every film it ever scored.
Those films carry what the site's pictures look like (devices, processing, population)
without any label. SimSiam (Chen and He, "Exploring Simple Siamese Representation
Learning", CVPR 2021) learns from them by asking two augmented views of the same film to
give the same features: no negative pairs, no momentum encoder, no large batches, so it
runs on a CPU with batches of 128. The backbone it trains is the seed CNN's own layers
(``conv1`` ... ``dense``); a projector and a predictor sit on top during pretraining and
are thrown away after it. Fine-tuning on the report labels then starts from those layers
(:func:`batchscan.site.training.train` with the pretrained model as its base).

The pretraining starts from the base model's weights (the shipped one by default), so it
adapts features that already read chest radiographs to the site's films rather than
learning them from nothing. Whether it helps is measured, not assumed
(``jobs/experiments/adapt_levers.py``; docs/site/adapt.md): ``batchscan adapt``
uses it only with ``--pretrain``.

A collapsed representation (every film the same features, SimSiam's failure mode) is
detected: the spread of the normalised projections is recorded, and pretraining that
collapsed is not used (:class:`Pretrained` says so and the base weights are kept).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

#: The seed CNN's layers that pretraining trains (the last, ``score``, is left as it is).
BACKBONE_LAYERS: Final = ("conv1", "conv2", "dense")
#: Width of the projector's output and of the predictor's bottleneck (SimSiam's ratio 4).
PROJECTION: Final = 128
BOTTLENECK: Final = 32
#: Pairs of views seen in a pretraining run by default (about two minutes on two CPU cores).
DEFAULT_VIEWS: Final = 40_000
BATCH_SIZE: Final = 128
#: SGD as in SimSiam (lr 0.05 x batch / 256, momentum 0.9, weight decay 1e-4, cosine decay).
LEARNING_RATE: Final = 0.05 * BATCH_SIZE / 256
#: Below this standard deviation of the l2-normalised projections (per dimension, averaged)
#: the representation counts as collapsed; an uncollapsed one sits near 1 / sqrt(128) = 0.088.
COLLAPSE_STD: Final = 0.02
#: The augmentations of the two views: stronger than the supervised ones (SimSiam needs
#: views that differ), still a chest radiograph (no flips: a mirrored chest is not a film
#: the job meets).
AUGMENTATION: Final = {
    "rotation_degrees": 12.0,
    "translation_fraction": 0.10,
    "zoom_fraction": 0.25,
    "contrast_factor": 0.40,
    "brightness_delta": 0.20,
    "noise_std": 0.03,
}


@dataclass(frozen=True, slots=True)
class Pretrained:
    """What a pretraining run gives.

    Attributes
    ----------
    weights:
        Backbone weights by layer name (:data:`BACKBONE_LAYERS`), to be set on a seed model
        before fine-tuning; None when the run collapsed (the base weights are kept).
    facts:
        What the model card records: images, views seen, epochs, loss at start and end,
        the projections' spread, seconds, whether it collapsed.
    """

    weights: dict[str, list[np.ndarray]] | None
    facts: dict[str, Any]


def _augmenter(seed: int) -> Any:
    import keras

    a = AUGMENTATION
    return keras.Sequential(
        [
            keras.layers.RandomZoom(
                (-a["zoom_fraction"], a["zoom_fraction"] / 3), fill_mode="reflect", seed=seed
            ),
            keras.layers.RandomRotation(
                a["rotation_degrees"] / 360.0, fill_mode="reflect", seed=seed + 1
            ),
            keras.layers.RandomTranslation(
                a["translation_fraction"],
                a["translation_fraction"],
                fill_mode="reflect",
                seed=seed + 2,
            ),
            keras.layers.RandomContrast(
                a["contrast_factor"], value_range=(0.0, 1.0), seed=seed + 3
            ),
            keras.layers.RandomBrightness(
                a["brightness_delta"], value_range=(0.0, 1.0), seed=seed + 4
            ),
            keras.layers.GaussianNoise(a["noise_std"], seed=seed + 5),
        ],
        name="simsiam_views",
    )


def _heads() -> tuple[Any, Any]:
    """SimSiam's projector (two layers, batch-normalised output) and predictor (bottleneck)."""
    import keras

    projector = keras.Sequential(
        [
            keras.layers.Dense(PROJECTION, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(PROJECTION, use_bias=False),
            keras.layers.BatchNormalization(),
        ],
        name="projector",
    )
    predictor = keras.Sequential(
        [
            keras.layers.Dense(BOTTLENECK, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(PROJECTION),
        ],
        name="predictor",
    )
    return projector, predictor


def pretrain(
    base: Any,
    inputs: np.ndarray,
    *,
    views: int = DEFAULT_VIEWS,
    seed: int = 1234,
    verbose: bool = False,
) -> Pretrained:
    """SimSiam on `inputs` (N, 64, 64) or (N, 64, 64, 3) model inputs in [0, 1], starting
    from the backbone of `base` (a Keras model of the seed architecture).

    Parameters
    ----------
    base:
        The model whose ``conv1``, ``conv2`` and ``dense`` layers start the backbone; it is
        not changed.
    inputs:
        Unlabelled model inputs (the store's, of the training period only).
    views:
        Pairs of augmented views to see in all (rounded up to whole epochs).
    seed:
        Seed of the order, the augmentations and the heads' weights.

    Raises
    ------
    ValueError
        Fewer than two batches of inputs (nothing to learn from).
    """
    import keras
    import tensorflow as tf

    from batchscan.scoring.model import build_seed_model

    x = np.asarray(inputs, np.float32)
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    if len(x) < 2 * BATCH_SIZE:
        raise ValueError(f"pretraining needs at least {2 * BATCH_SIZE} inputs, got {len(x)}")
    keras.utils.set_random_seed(seed)
    model = build_seed_model()
    model.set_weights(base.get_weights())
    backbone = keras.Model(model.inputs, model.get_layer("dense").output, name="backbone")
    projector, predictor = _heads()
    augment = _augmenter(seed)
    steps_per_epoch = len(x) // BATCH_SIZE
    epochs = max(1, math.ceil(views / (steps_per_epoch * BATCH_SIZE)))
    schedule = keras.optimizers.schedules.CosineDecay(LEARNING_RATE, epochs * steps_per_epoch)
    optimizer = keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=1e-4)

    def negative_cosine(p: Any, z: Any) -> Any:
        z = tf.stop_gradient(z)
        return -tf.reduce_mean(
            tf.reduce_sum(tf.math.l2_normalize(p, axis=1) * tf.math.l2_normalize(z, axis=1), 1)
        )

    @tf.function(reduce_retracing=True)
    def step(batch: Any) -> tuple[Any, Any]:
        one = tf.clip_by_value(augment(batch, training=True), 0.0, 1.0)
        two = tf.clip_by_value(augment(batch, training=True), 0.0, 1.0)
        with tf.GradientTape() as tape:
            z1 = projector(backbone(one, training=True), training=True)
            z2 = projector(backbone(two, training=True), training=True)
            p1, p2 = predictor(z1, training=True), predictor(z2, training=True)
            loss = 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)
        variables = (
            backbone.trainable_variables
            + projector.trainable_variables
            + predictor.trainable_variables
        )
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        spread = tf.reduce_mean(tf.math.reduce_std(tf.math.l2_normalize(z1, axis=1), axis=0))
        return loss, spread

    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    losses: list[float] = []
    spreads: list[float] = []
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        epoch_losses = []
        for k in range(steps_per_epoch):
            loss, spread = step(tf.constant(x[order[k * BATCH_SIZE : (k + 1) * BATCH_SIZE]]))
            epoch_losses.append(float(loss))
            spreads.append(float(spread))
        losses.append(float(np.mean(epoch_losses)))
        if verbose:
            print(f"pretraining epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}", flush=True)
    spread = float(np.mean(spreads[-steps_per_epoch:]))
    collapsed = spread < COLLAPSE_STD
    facts = {
        "method": "SimSiam (Chen and He, CVPR 2021) on the seed CNN's conv1, conv2 and dense "
        "layers, started from the base model; projector and predictor discarded after it",
        "images": len(x),
        "views_seen": epochs * steps_per_epoch * BATCH_SIZE,
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "optimizer": f"SGD(cosine from {LEARNING_RATE}, momentum 0.9, weight decay 1e-4)",
        "augmentation": AUGMENTATION,
        "loss_first_epoch": round(losses[0], 4),
        "loss_last_epoch": round(losses[-1], 4),
        "projection_std": round(spread, 4),
        "collapsed": collapsed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    weights = (
        None
        if collapsed
        else {name: model.get_layer(name).get_weights() for name in BACKBONE_LAYERS}
    )
    return Pretrained(weights=weights, facts=facts)


def with_backbone(base: Any, pretrained: Pretrained) -> Any:
    """A seed model with `base`'s weights and the pretrained backbone (the base itself
    when pretraining collapsed)."""
    from batchscan.scoring.model import build_seed_model

    model = build_seed_model()
    model.set_weights(base.get_weights())
    for name, weights in (pretrained.weights or {}).items():
        model.get_layer(name).set_weights(weights)
    return model
