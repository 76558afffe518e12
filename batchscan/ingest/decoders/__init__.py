"""Decoders: one small module per codec behind one interface, tried in order.

Each module (like pydicom's decoder plugins) has ``NAME``, ``is_available(ds)`` and
``decode(frame, ds, level) -> Decoded | None``; :data:`DECODERS` is the order
they are offered a frame, and the first that returns pixels names itself in the ``decoder``
column of ``images.parquet``. A decoder that raises or returns None passes the frame on, so
a frame one codec refuses is still read by the next (the 12-bit JPEG files with a wrong
scan header that pylibjpeg refuses and libjpeg-turbo reads); the last is pydicom, whose
error is the one recorded when nothing could read the frame.

=========================  ================================================================
decoder (``NAME``)         what it decodes
=========================  ================================================================
``pillow-openjpeg``        JPEG 2000, at a reduced resolution level (:mod:`.jpeg2000`)
``pillow-libjpeg``         8-bit JPEG baseline, scaled in the IDCT (:mod:`.jpeg`)
``libjpeg-turbo``          JPEG baseline, extended 12-bit, lossless 14 / SV1 (:mod:`.turbo`)
``pydicom[:<plugin>]``     everything pydicom's plugins read (:mod:`.pydicom_plugins`)
=========================  ================================================================

**Reduced resolution.** The model sees a 28 x 28 picture; a 2000-px radiograph holds some
5,000 times more pixels. So before normalization every image is brought down, by a power of
two, to the smallest size whose short edge is still at least ``min_edge`` pixels
(:data:`DEFAULT_MIN_EDGE` = 448: with 224 the extra halving moved scores on the test split
by up to 0.008; with 448 by at most 0.0034). Codecs that can decode at reduced resolution do
so (JPEG 2000 resolution levels, JPEG DCT scaling); whatever comes back larger is reduced by
box averaging of the stored values (:func:`box_reduce`).

Averaging stored values before the (monotonic, mostly linear) VOI window is what a
reduced-resolution codec does too; the score agreement with full-resolution decoding is
tested on real files and measured on the test split (``jobs/experiments/reduced_decode_check.py``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Final

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from batchscan.ingest.decoders import jpeg, jpeg2000, pydicom_plugins, turbo
from batchscan.ingest.decoders.base import Decoded, reduction_level

__all__ = [
    "DECODERS",
    "DECODER_NAMES",
    "DEFAULT_MIN_EDGE",
    "Decoded",
    "box_reduce",
    "decode_frame",
    "reduction_level",
]

#: Default smallest short edge (pixels) an image is decoded at.
DEFAULT_MIN_EDGE: Final = 448
#: The decoders, in the order they are offered a frame; pydicom comes last.
DECODERS: Final[tuple[ModuleType, ...]] = (jpeg2000, jpeg, turbo, pydicom_plugins)
#: Every value of the ``decoder`` column (``pydicom:<plugin>`` adds the plugin's name).
DECODER_NAMES: Final = tuple(module.NAME for module in DECODERS)


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


def first_frame(ds: Dataset) -> bytes | None:
    """The encoded bytes of the first frame of an encapsulated image; None for native data."""
    if not getattr(ds["PixelData"], "is_undefined_length", False):
        return None
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def decode_frame(ds: Dataset, min_edge: int | None) -> Decoded:
    """Decode the first frame with the first decoder of :data:`DECODERS` that can.

    With `min_edge`, reduced-resolution codecs may return the picture at 1 / 2**level, as
    long as its short edge stays >= `min_edge` (see :func:`reduction_level`); JPEG 2000 goes
    further, to a wavelet band the preprocessing reads as such (see
    :mod:`batchscan.ingest.decoders.jpeg2000`). The result's sampling says which.

    Raises
    ------
    Exception
        What pydicom raised, when no decoder could read the frame.
    """
    level = reduction_level(int(ds.Rows), int(ds.Columns), min_edge) if min_edge else 0
    frame: bytes | None = None
    framed = False
    for decoder in DECODERS:
        if not decoder.is_available(ds):
            continue
        if decoder is pydicom_plugins:
            result = decoder.decode(None, ds, level)
        else:
            try:
                if not framed:
                    frame, framed = first_frame(ds), True
                result = decoder.decode(frame, ds, level)
            except Exception:  # corrupt data: the next decoder, finally pydicom, says what
                continue
        if result is not None:
            return result
    raise RuntimeError("no decoder returned pixels")  # pydicom always returns or raises
