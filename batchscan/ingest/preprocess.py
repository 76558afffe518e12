"""Canonical preprocessing: one display-normalized 2-D image -> one model input.

Why one function: the CNN only ever saw PneumoniaMNIST images, which were made by
centre-cropping the source radiograph to its short edge and resizing it to 28 x 28. If
inference on a 2000-px radiograph took any other route (another crop, another filter) the
model would see pictures unlike those it was trained on. So the training job and the scan
job both call :func:`preprocess`, and the steps are written down as
:data:`PREPROCESSING_SPEC`, which the model card records and inference checks.

A 28 x 28 training image enters the very same function: its crop is a no-op and its resize
to 28 x 28 is the identity.

A picture decoded at reduced resolution is resized like pixels when its samples are box
averages; a JPEG 2000 wavelet band is not pixel-like, and step 2 is then the least-squares
estimate of what it gives on the full-resolution picture (:mod:`batchscan.ingest.sampling`): the
same picture, estimated from fewer samples, not another preprocessing.

Version 2 dropped version 1's rounding of the 28 x 28 picture to uint8 levels: it was the
identity on the training pictures, but on a radiograph it turned differences of 0.0001 in a
pixel into a whole grey level, and the model's score moved by up to 0.02 between two
equally valid decodes of the same file (full vs reduced resolution).
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
from PIL import Image

from batchscan.ingest.sampling import Sampling, resize

#: Side of the intermediate square picture (the resolution of the training data).
SOURCE_SIZE: Final = 28
#: Side of the model input.
INPUT_SIZE: Final = 64
#: Channels of the model input (the grayscale picture repeated).
CHANNELS: Final = 3

#: Version of the model input a file gives, whatever makes it: decoders, the windowing and
#: modality transforms, the blank rule and :func:`preprocess`. The model-input store
#: (:mod:`batchscan.scoring.input_store`) keeps inputs under this version, so a release that leaves
#: it alone rescores the stored inputs instead of reading the archive again. Raise it with
#: any change that moves an input; ``tests/test_input_digests.py`` fails when an input of
#: the test files changes while this stays (5: row format 5 of 0.5.0, the last change).
INPUT_VERSION: Final = 5

#: The versioned description of :func:`preprocess`. The model card stores it; a model whose
#: card names another spec is refused, because its scores would be meaningless here.
PREPROCESSING_SPEC: Final[dict[str, Any]] = {
    "name": "batchscan-cxr",
    "version": 2,
    "input": "2-D display image, float in [0, 1], 0 = black (MONOCHROME2 sense); uint8 "
    "input is taken as x / 255",
    "steps": [
        "centre-crop to the short edge (square)",
        f"resize to {SOURCE_SIZE}x{SOURCE_SIZE} with Pillow BICUBIC (antialiased when reducing),"
        " float32, clipped to [0, 1]; from a wavelet band, the least-squares estimate of that "
        "resize of the full-resolution picture",
        f"resize to {INPUT_SIZE}x{INPUT_SIZE} with Pillow BILINEAR (float32), clipped to [0, 1]",
        f"repeat the channel {CHANNELS} times",
    ],
    "source_size": SOURCE_SIZE,
    "input_size": INPUT_SIZE,
    "channels": CHANNELS,
    "dtype": "float32",
    "range": [0.0, 1.0],
}


def spec_is_supported(spec: object) -> bool:
    """Return whether `spec` (from a model card) describes exactly what :func:`preprocess` does.

    Parameters
    ----------
    spec:
        The ``preprocessing`` entry of a model card.

    Returns
    -------
    bool
        True only for the same name and version as :data:`PREPROCESSING_SPEC`.
    """
    return (
        isinstance(spec, dict)
        and spec.get("name") == PREPROCESSING_SPEC["name"]
        and spec.get("version") == PREPROCESSING_SPEC["version"]
    )


def to_source(
    display: np.ndarray, sampling: Sampling | None = None, size: int = SOURCE_SIZE
) -> np.ndarray:
    """Steps 1-2 of the spec: crop the centre square and reduce it to 28 x 28 (`size`).

    Parameters
    ----------
    display:
        2-D array, float in [0, 1] (any float dtype) with 0 = black.
    sampling:
        What `display`'s samples are (:mod:`batchscan.ingest.sampling`); None, or samples that are
        box averages, are resized as pixels; from a wavelet band the resize is estimated
        (:func:`batchscan.ingest.sampling.resize`).
    size:
        Side of the square picture: :data:`SOURCE_SIZE` for every shipped model; a base
        trained at another resolution is measured with it (``jobs/experiments/base64_check.py``).

    Returns
    -------
    numpy.ndarray
        (size, size) float32 in [0, 1].

    Raises
    ------
    ValueError
        If `display` is not a non-empty 2-D array, or not the shape its sampling makes.
    """
    if display.ndim != 2 or min(display.shape) < 1:
        raise ValueError(f"expected a non-empty 2-D image, got shape {display.shape}")
    picture = resize(display, (size, size), sampling, square=True)
    return np.clip(picture, 0.0, 1.0)


def source_to_input(source: np.ndarray) -> np.ndarray:
    """Steps 3-4 of the spec: a (28, 28) picture in [0, 1] -> (64, 64, 3) float32 in [0, 1]
    (a 64 x 64 picture is left as it is: Pillow's resize to the same size is a copy)."""
    picture = Image.fromarray(np.ascontiguousarray(source, dtype=np.float32), mode="F")
    large = np.asarray(
        picture.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR), dtype=np.float32
    )
    large = np.clip(large, 0.0, 1.0)
    return np.repeat(large[:, :, np.newaxis], CHANNELS, axis=2)


def preprocess(
    display: np.ndarray, sampling: Sampling | None = None, size: int = SOURCE_SIZE
) -> np.ndarray:
    """Turn one display-normalized image into the model input, as :data:`PREPROCESSING_SPEC`.

    This is the only route from pixels to model input, for training and inference alike.

    Parameters
    ----------
    display:
        2-D array, float in [0, 1], 0 = black; or a (28, 28) uint8 training picture, which
        is taken as ``display / 255``.
    sampling:
        What the decoder's samples are (see :func:`to_source`); None for pixels.
    size:
        Side of the intermediate square picture (see :func:`to_source`); anything but
        :data:`SOURCE_SIZE` makes inputs no shipped model was trained on.

    Returns
    -------
    numpy.ndarray
        (64, 64, 3) float32 in [0, 1].

    Raises
    ------
    ValueError
        If `display` is not a non-empty 2-D array (of the shape its sampling makes).
    """
    if display.dtype == np.uint8:
        display = display.astype(np.float32) / 255.0
    return source_to_input(to_source(display, sampling, size))


def preprocess_many(images: np.ndarray | list[np.ndarray], size: int = SOURCE_SIZE) -> np.ndarray:
    """Apply :func:`preprocess` to each image; returns (N, 64, 64, 3) float32."""
    out = np.empty((len(images), INPUT_SIZE, INPUT_SIZE, CHANNELS), dtype=np.float32)
    for i, image in enumerate(images):
        out[i] = preprocess(image, size=size)
    return out
