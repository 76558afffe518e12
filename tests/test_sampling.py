"""batchscan.ingest.sampling: what reduced samples are, and full-resolution views estimated
from them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from batchscan.ingest.preprocess import preprocess
from batchscan.ingest.sampling import (
    IRREVERSIBLE_9_7,
    REVERSIBLE_5_3,
    Box,
    Sampling,
    WaveletBand,
    apply_steps,
    axis_matrix,
    reconstruction,
    resize,
)


def _smooth_image(size: int, seed: int) -> np.ndarray:
    """A random radiograph-like picture in [0, 1]: smooth anatomy, a sharp collimator edge,
    a little noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((12, 12)).astype(np.float32)
    picture = np.asarray(
        Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    )
    picture = 0.2 + 0.6 * (picture - picture.min()) / np.ptp(picture)
    picture[:, : size // 20] = 0.05  # collimated border
    picture += rng.normal(0.0, 0.01, picture.shape).astype(np.float32)
    return np.clip(picture, 0.0, 1.0).astype(np.float32)


def _band(image: np.ndarray, sampling: Sampling) -> np.ndarray:
    return apply_steps(sampling.steps, apply_steps(sampling.steps, image).T).T


def test_steps_sizes_and_values() -> None:
    assert Box(4).size(2050) == 512
    assert WaveletBand(REVERSIBLE_5_3, 3).size(2050) == 257  # JPEG 2000 rounds up
    assert Sampling((2048, 1000), (WaveletBand(1, 2), Box(2))).sampled_shape() == (256, 125)
    ramp = np.arange(64, dtype=np.float64)[:, None]
    for transform in (REVERSIBLE_5_3, IRREVERSIBLE_9_7):
        # DC gain 1, and inside the image a straight line stays on its even samples
        band = WaveletBand(transform, 1).apply(ramp)
        assert np.allclose(band[2:-2, 0], ramp[4:-4:2, 0])
        assert np.allclose(WaveletBand(transform, 2).apply(np.ones((50, 3))), 1.0)
    assert np.allclose(Box(2).apply(ramp)[:3, 0], [0.5, 2.5, 4.5])
    matrix = axis_matrix(100, (WaveletBand(REVERSIBLE_5_3, 2),))
    assert matrix.shape == (25, 100) and np.allclose(matrix.sum(axis=1), 1.0)


def test_reconstruction_reproduces_its_samples() -> None:
    """The estimate is consistent: sampled again, it gives back the samples it came from."""
    for steps in ((WaveletBand(REVERSIBLE_5_3, 3),), (WaveletBand(IRREVERSIBLE_9_7, 1), Box(2))):
        a = axis_matrix(600, steps)
        g = reconstruction(600, steps)
        assert g.shape == (600, a.shape[0]) and not g.flags.writeable
        assert np.abs(a @ g - np.eye(a.shape[0])).max() < 1e-3


def test_resize_from_a_band_estimates_the_full_resize() -> None:
    """From a three-level band of a 1024 px picture the 28 px picture comes out close to the
    one made from all the pixels, and far closer than the band resized as if it were pixels;
    likewise the non-square window sample."""
    for seed in range(3):
        image = _smooth_image(1024, seed)
        sampling = Sampling(image.shape, (WaveletBand(REVERSIBLE_5_3, 3),))
        band = _band(image, sampling).astype(np.float32)
        full = resize(image, (28, 28), square=True)
        estimated = resize(band, (28, 28), sampling, square=True)
        naive = resize(band, (28, 28), square=True)
        assert np.abs(estimated - full).max() < 0.003
        assert np.abs(estimated - full).max() < np.abs(naive - full).max() / 3
    wide = _smooth_image(1024, 5)[:, :800]
    sampling = Sampling(wide.shape, (WaveletBand(IRREVERSIBLE_9_7, 2),))
    sample = resize(_band(wide, sampling).astype(np.float32), (80, 62), sampling)
    assert np.abs(sample - resize(wide, (80, 62))).max() < 0.005


def test_preprocess_reads_a_band_through_its_sampling() -> None:
    image = _smooth_image(512, 7)
    sampling = Sampling(image.shape, (WaveletBand(REVERSIBLE_5_3, 2),))
    band = _band(image, sampling).astype(np.float32)
    assert np.abs(preprocess(band, sampling) - preprocess(image)).max() < 0.003
    with pytest.raises(ValueError, match="does not match its sampling"):
        preprocess(band[:-1], sampling)
    # box averages are resized as pixels: the same as giving no sampling
    boxed = Box(2).apply(Box(2).apply(image).T).T.astype(np.float32)
    same = preprocess(boxed, Sampling(image.shape, (Box(2),)))
    assert np.array_equal(same, preprocess(boxed))


def test_only_bands_small_enough_to_estimate_from() -> None:
    assert Sampling((4280, 3520), (WaveletBand(REVERSIBLE_5_3, 3),)).estimable()
    assert not Sampling((60000, 4000), (WaveletBand(REVERSIBLE_5_3, 4),)).estimable()
