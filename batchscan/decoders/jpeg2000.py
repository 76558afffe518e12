"""JPEG 2000 at reduced resolution: OpenJPEG's reduce factor, through Pillow.

A JPEG 2000 codestream stores the image as a pyramid of resolution levels (wavelet
decompositions); decoding only the lower levels skips most of the work (2048 x 2048
lossless: ~550 ms in full, ~14 ms at 1/8).

Two Pillow facts this module works around, both checked by the tests:

* Pillow returns samples scaled to 16 bits (a 12-bit image comes back times 16); the
  codestream's precision (SIZ marker) tells the shift that undoes it.
* Pillow (up to at least 13.0) sizes a reduced image by rounding to nearest, OpenJPEG by
  rounding up; where they differ the decode fails. Only levels where both agree for both
  dimensions are used (any level for sizes divisible by 2**level; for RG1's 1955 x 1841
  only level 1); the remaining reduction is done by box averaging.

Two facts of the wavelet transform, measured on the test split written as DICOM
(``jobs/reduced_decode_check.py``):

* sample k of resolution level r sits on full-resolution pixel k * 2**r, not in the middle
  of its 2**r pixels as a box average does: the decoded grid is offset by
  0.5 - 2**-(r + 1) of its pixels, which the preprocessing compensates;
* the wavelet low-pass is sharper than a box average: block means near strong edges differ
  by up to ~1 % of the range. That matters only where the display window is computed from
  the pixels (the percentile fallback of :mod:`batchscan.dicom`, whose 0.5th percentile
  moved by up to 18 stored values): on 100 test images at 2048 px without a window in the
  header, scores moved by up to 0.0034 at level 1 but 0.0103 at level 2; with the header's
  window, by 0.0010 / 0.0011 at level 1 and 0.0025 (lossy) / 0.0033 (lossless) at level 2.
  So two levels are taken from the codestream when the file has its own VOI (as CR and DX
  files do) and one otherwise (:func:`max_level`); the rest is box averaging.
"""

from __future__ import annotations

import io
import struct
from typing import Final

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000, JPEG2000Lossless

from batchscan.decoders.base import Decoded, syntax_of

NAME: Final = "pillow-openjpeg"
SYNTAXES: Final = frozenset({JPEG2000Lossless, JPEG2000})
#: Most resolution levels dropped by the codec, without and with a VOI in the header (see
#: the module doc).
MAX_LEVEL_PERCENTILE: Final = 1
MAX_LEVEL_WINDOWED: Final = 2


def max_level(windowed: bool) -> int:
    """Most levels the codec may drop: more when the display window comes from the header."""
    return MAX_LEVEL_WINDOWED if windowed else MAX_LEVEL_PERCENTILE


_SIZ: Final = b"\xff\x51"
_COD: Final = b"\xff\x52"


def is_available(ds: Dataset) -> bool:
    """True for a single-sample JPEG 2000 image that Pillow can decode."""
    if syntax_of(ds) not in SYNTAXES:
        return False
    try:
        from PIL import features

        return bool(features.check_codec("jpg_2000")) and int(ds.SamplesPerPixel) == 1
    except Exception:
        return False


def _codestream_facts(frame: bytes) -> tuple[int, int, int, bool, int] | None:
    """(width, height, precision, signed, levels) from the SIZ and COD markers, or None."""
    siz = frame.find(_SIZ, 0, 256)
    cod = frame.find(_COD, 0, 4096)
    if siz < 0 or cod < 0 or len(frame) < siz + 43:
        return None
    width, height, x_offset, y_offset = struct.unpack(">IIII", frame[siz + 6 : siz + 22])
    components = struct.unpack(">H", frame[siz + 38 : siz + 40])[0]
    if components != 1 or x_offset or y_offset:
        return None
    ssiz = frame[siz + 40]
    levels = frame[cod + 9]
    return width, height, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), levels


def _pillow_agrees(size: int, level: int) -> bool:
    """Whether Pillow's rounded size equals OpenJPEG's ceiling at `level`."""
    power = 1 << level
    return int((size + (power >> 1)) / power) == -(-size // power)


def grid_offset(level: int) -> float:
    """Offset of a level-`level` grid against box averaging, in its own pixels."""
    return 0.5 - 2.0 ** -(level + 1) if level else 0.0


def decode(
    frame: bytes | None, ds: Dataset, level: int, *, windowed: bool = False
) -> Decoded | None:
    """Decode `frame` at 1 / 2**r of its size for the largest usable r <= `level` (and
    <= :func:`max_level` of `windowed`).

    Returns stored values (the dtype pydicom would give), r and the grid offset; None when
    no level > 0 is usable (signed data, several components, image offsets, a precision
    over 16 bits).
    """
    from PIL import Image

    if frame is None:
        return None
    facts = _codestream_facts(frame)
    if facts is None:
        return None
    width, height, precision, signed, levels = facts
    if signed or precision > 16:
        return None
    usable = min(level, levels, max_level(windowed))
    while usable > 0 and not (_pillow_agrees(width, usable) and _pillow_agrees(height, usable)):
        usable -= 1
    if usable == 0:
        return None
    with Image.open(io.BytesIO(frame)) as picture:
        picture.reduce = usable  # Pillow's Jpeg2KImageFile setter: OpenJPEG's reduce factor
        picture.load()
        values = np.asarray(picture)
    if values.dtype == np.uint8:
        return Decoded(values.copy(), usable, grid_offset(usable), NAME)
    values = values.astype(np.uint16, copy=False)
    if picture.mode.startswith("I;16") and precision < 16:
        values = values >> (16 - precision)
    return Decoded(values, usable, grid_offset(usable), NAME)
