"""Reduced-resolution decoding: decode no more pixels than the 64 x 64 model input needs.

The model sees a 28 x 28 picture; a 2000-px radiograph holds some 5,000 times more pixels.
Decoding them all costs most of a run (JPEG 2000 lossless: ~0.5 s per image). So before
normalization every image is brought down, by a power of two, to the smallest size whose
short edge is still at least ``min_edge`` pixels (:data:`DEFAULT_MIN_EDGE` = 448: with 224 the
extra halving moved scores on the test split by up to 0.008; with 448 by at most 0.0034):

* codecs that can decode at reduced resolution do so (one small module each, like pydicom's
  decoder plugins: ``SYNTAXES`` at the top, ``is_available(ds)`` and ``decode(frame, ds,
  level) -> (values, level, offset)``): JPEG 2000 resolution levels and JPEG DCT scaling,
  both through Pillow;
* everything else (native, RLE, JPEG-LS, JPEG 2000 levels a codec refuses) is decoded in full
  by pydicom and reduced by box averaging of the stored values (:func:`box_reduce`).

Averaging stored values before the (monotonic, mostly linear) VOI window is what a
reduced-resolution codec does too; the score agreement with full-resolution decoding is
tested on real files and measured on the test split (``jobs/benchmark.py --verify``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Final

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from batchscan.decoders import jpeg, jpeg2000

#: Default smallest short edge (pixels) an image is decoded at.
DEFAULT_MIN_EDGE: Final = 448
#: Reduced-resolution decoders, tried in order.
DECODERS: Final[tuple[ModuleType, ...]] = (jpeg2000, jpeg)


def reduction_level(rows: int, columns: int, min_edge: int) -> int:
    """Largest r such that the short edge, halved r times (rounding up), stays >= min_edge."""
    level = 0
    short = min(rows, columns)
    while -(-short // (2 ** (level + 1))) >= min_edge:
        level += 1
    return level


def box_reduce(arr: np.ndarray, factor: int) -> np.ndarray:
    """Mean of `factor` x `factor` blocks, rounded, in the input's integer type.

    The last rows/columns that do not fill a block are dropped (at most factor - 1 pixels of
    a 2000-px border). Sums in a wide type, as `factor` strided adds per axis: numpy's
    reduction over a tiny inner axis is about 4x slower, and no float copy is made.
    """
    if factor <= 1:
        return arr
    rows, cols = (arr.shape[0] // factor) * factor, (arr.shape[1] // factor) * factor
    kind = arr.dtype.kind
    wide = np.float64 if kind == "f" else np.int64 if kind == "i" else np.uint32
    arr = arr[:rows, :cols]
    by_rows = arr[0::factor].astype(wide)
    for i in range(1, factor):
        by_rows += arr[i::factor]
    total = by_rows[:, 0::factor].copy()
    for j in range(1, factor):
        total += by_rows[:, j::factor]
    area = factor * factor
    if kind == "f":
        return (total / area).astype(arr.dtype)
    return np.floor_divide(total + area // 2, area).astype(arr.dtype)


def first_frame(ds: Dataset) -> bytes:
    """The encoded bytes of the only frame of an encapsulated single-frame image."""
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def decode_reduced(
    ds: Dataset, min_edge: int, *, windowed: bool = False
) -> tuple[np.ndarray, int, float] | None:
    """Decode at reduced resolution with a codec that can; None when none applies.

    `windowed` says the display window will come from the header's VOI, not from the pixels;
    some codecs may then drop more levels (see :mod:`batchscan.decoders.jpeg2000`).

    Returns
    -------
    (numpy.ndarray, int, float) or None
        Stored values at 1 / 2**level of the full size, that level, and the sub-pixel
        offset of the decoded grid (array coordinate minus true coordinate, in decoded
        pixels; 0 for a box-like reduction).
    """
    level = reduction_level(int(ds.Rows), int(ds.Columns), min_edge)
    if level == 0:
        return None
    for decoder in DECODERS:
        if decoder.is_available(ds):
            try:
                result = decoder.decode(first_frame(ds), ds, level, windowed=windowed)
            except Exception:  # corrupt data: the full decode path reports what is wrong
                continue
            if result is not None:
                return result
    return None
