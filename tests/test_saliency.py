"""HiResCAM: the map lies where the evidence is, and the pictures it is drawn on."""

from __future__ import annotations

import numpy as np
import pytest

from batchscan.results.saliency import Explainer, data_uri, display_square, mass_in, overlay

#: The only region where the toy data's label can be read: a 16 x 16 square at the top right.
REGION = (slice(8, 24), slice(40, 56))


def _pictures(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random backgrounds (no information) and, for positives only, a bright blob
    inside REGION at a random place."""
    y = rng.integers(0, 2, n)
    x = np.empty((n, 64, 64, 3), np.float32)
    grid = np.mgrid[:64, :64]
    for i in range(n):
        coarse = rng.random((8, 8))
        background = np.kron(coarse, np.ones((8, 8))) * 0.5 + 0.1
        if y[i]:
            cy, cx = rng.integers(12, 20), rng.integers(44, 52)
            blob = np.exp(-((grid[0] - cy) ** 2 + (grid[1] - cx) ** 2) / 8.0)
            background = background + 0.6 * blob
        x[i] = np.clip(background, 0, 1)[..., None]
    return x, y


@pytest.fixture(scope="module")
def toy_model():
    """The seed architecture, trained a little on data whose evidence is REGION only."""
    import keras

    from batchscan.scoring.model import build_seed_model

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = _pictures(600, rng)
    model = build_seed_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    model.fit(x, y.astype(np.float32), epochs=6, batch_size=32, verbose=0)
    test_x, test_y = _pictures(200, np.random.default_rng(1))
    accuracy = float(((model.predict(test_x, verbose=0)[:, 0] > 0.5) == test_y).mean())
    assert accuracy > 0.9, "the toy model must have learned the blob for the test to mean much"
    return model


def test_the_map_lies_where_the_only_evidence_is(toy_model) -> None:
    explainer = Explainer(toy_model)
    x, y = _pictures(40, np.random.default_rng(2))
    maps = explainer.maps(x[y == 1])
    region = np.zeros((64, 64), bool)
    region[REGION] = True
    shares = [mass_in(m, region) for m in maps]
    # the region is 6 % of the picture; the maps put most of their mass in it (85 % here)
    assert np.median(shares) > 0.6, shares
    assert maps.shape == (int((y == 1).sum()), 64, 64)
    assert maps.min() >= 0.0 and maps.max() <= 1.0


def test_the_shipped_model_gives_a_map_of_the_input_size() -> None:
    from batchscan.ingest.preprocess import preprocess
    from batchscan.scoring.model import load_model
    from batchscan.synth import chest_phantom

    explainer = Explainer(load_model().keras_model)
    inputs = np.stack([preprocess(chest_phantom(128, seed=s, opacity=0.9)) for s in (1, 2)])
    maps = explainer.maps(inputs)
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()


def test_overlay_and_picture() -> None:
    pixels = np.linspace(0, 1, 300 * 200, dtype=np.float32).reshape(300, 200)
    square = display_square(pixels, None, size=128)
    assert square.shape == (128, 128)
    heat = np.zeros((64, 64), np.float32)
    heat[:8, :8] = 1.0
    rgb = overlay(square, heat)
    assert rgb.shape == (128, 128, 3) and rgb.dtype == np.uint8
    assert rgb[2, 2, 0] != rgb[2, 2, 2]  # coloured where the heat is
    assert rgb[100, 100, 0] == rgb[100, 100, 1] == rgb[100, 100, 2]  # grey elsewhere
    assert data_uri(rgb).startswith("data:image/jpeg;base64,")
    assert (
        mass_in(heat, heat > 0.5) == 1.0 and mass_in(np.zeros((2, 2)), np.ones((2, 2), bool)) == 0
    )
