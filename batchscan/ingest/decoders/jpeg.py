"""JPEG baseline at reduced resolution: libjpeg(-turbo)'s DCT scaling, through Pillow.

A JPEG decoder can produce 1/2, 1/4 or 1/8 of the picture straight from the DCT
coefficients (Pillow's ``draft`` mode). Only 8-bit grayscale is handled here (a chest
radiograph in JPEG baseline); 12-bit JPEG extended and colour take the full decode path.
"""

from __future__ import annotations

import io
from typing import Final

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

from batchscan.ingest.decoders.base import Decoded, syntax_of
from batchscan.ingest.sampling import Box, Sampling

NAME: Final = "pillow-libjpeg"
SYNTAXES: Final = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})


def is_available(ds: Dataset) -> bool:
    """True for an 8-bit single-sample JPEG baseline/extended image."""
    if syntax_of(ds) not in SYNTAXES:
        return False
    try:
        return int(ds.SamplesPerPixel) == 1 and int(ds.BitsStored) <= 8
    except (AttributeError, TypeError, ValueError):
        return False


def decode(frame: bytes | None, ds: Dataset, level: int) -> Decoded | None:
    """Decode at 1 / 2**r (r <= min(level, 3)); returns uint8 stored values, r and their
    sampling: a box average of 2**r pixels (what a scaled IDCT output pixel stands for, its
    block's low frequencies; the preprocessing resizes it like pixels)."""
    from PIL import Image

    if frame is None or level == 0:
        return None
    scale = 1 << min(level, 3)
    with Image.open(io.BytesIO(frame)) as picture:
        if picture.mode != "L":
            return None
        width, height = picture.size
        picture.draft("L", (-(-width // scale), -(-height // scale)))
        picture.load()
        values = np.asarray(picture).copy()
    achieved = width // values.shape[1]
    r = achieved.bit_length() - 1
    if (1 << r) != achieved or r == 0:
        return None
    return Decoded(values, r, Sampling((height, width), (Box(achieved),)), NAME)
