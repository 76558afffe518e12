"""The canonical preprocessing: shape, range, identity on training pictures, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from batchscan.ingest.preprocess import (
    PREPROCESSING_SPEC,
    preprocess,
    preprocess_many,
    spec_is_supported,
    to_source,
)
from batchscan.ingest.sampling import centre_square


def test_output_is_model_input() -> None:
    out = preprocess(np.random.default_rng(0).random((300, 200), dtype=np.float32))
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.array_equal(out[..., 0], out[..., 2])


def test_training_picture_passes_unchanged_to_source_stage() -> None:
    picture = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    as_float = picture.astype(np.float32) / 255.0
    assert np.array_equal(to_source(as_float), as_float)
    # uint8 input is taken as display / 255: the same tensor either way
    assert np.array_equal(preprocess(picture), preprocess(picture.astype(np.float32) / 255.0))


def test_centre_crop_uses_short_edge() -> None:
    image = np.zeros((10, 30))
    image[:, 10:20] = 1.0
    square = centre_square(image)
    assert square.shape == (10, 10) and square.min() == 1.0


def test_large_image_matches_its_small_version() -> None:
    """A 2000 px picture and the same picture at 28 px give nearly the same model input."""
    yy, xx = np.mgrid[0:2000, 0:2000] / 2000.0
    big = (0.5 + 0.4 * np.sin(3 * xx) * np.cos(2 * yy)).astype(np.float32)
    small = to_source(big)
    assert np.abs(preprocess(big) - preprocess(small)).max() < 1e-6


def test_rejects_non_2d() -> None:
    with pytest.raises(ValueError):
        preprocess(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        preprocess(np.zeros((0, 4), np.float32))


def test_many_is_one_by_one() -> None:
    images = [np.random.default_rng(i).random((50, 60), dtype=np.float32) for i in range(3)]
    batch = preprocess_many(images)
    for i, image in enumerate(images):
        assert np.array_equal(batch[i], preprocess(image))


def test_spec_check() -> None:
    assert spec_is_supported(dict(PREPROCESSING_SPEC))
    assert not spec_is_supported({**PREPROCESSING_SPEC, "version": 99})
    assert not spec_is_supported("batchscan-cxr")


def test_a_64_px_picture_is_the_input_itself_at_size_64() -> None:
    """``size=64`` (a base measured at the design's 64 x 64, jobs/experiments/base64_check.py): the
    centre square is resized once, straight to the input, with no 28 px step."""
    rng = np.random.default_rng(3)
    picture = rng.random((64, 64)).astype(np.float32)
    tensor = preprocess(picture, size=64)
    np.testing.assert_array_equal(tensor, np.repeat(picture[..., None], 3, axis=2))
    wide = rng.random((100, 160)).astype(np.float32)
    assert not np.allclose(preprocess(wide, size=64), preprocess(wide))
