"""JPEG 2000 at reduced resolution: OpenJPEG's reduce factor, through Pillow.

A JPEG 2000 codestream stores the image as a pyramid of resolution levels (wavelet
decompositions); decoding only the lower levels skips most of the work (2048 x 2048
lossless: ~550 ms in full, ~9 ms at 1/8).

Two Pillow facts this module works around, both checked by the tests:

* Pillow returns samples scaled to 16 bits (a 12-bit image comes back times 16); the
  codestream's precision (SIZ marker) tells the shift that undoes it.
* Pillow (up to at least 13.0) sizes a reduced image by rounding to nearest, OpenJPEG by
  rounding up; where they differ the decode fails. Only levels where both agree for both
  dimensions are used (any level for sizes divisible by 2**level; for RG1's 1955 x 1841
  only level 1); the remaining reduction is done by box averaging.

The band is not a box average of the full image (its samples sit on the first pixel of
their block, its low-pass is sharper than a box, and it is mirrored at the border), so the
decoder says what it is (:class:`batchscan.ingest.sampling.WaveletBand`) and the preprocessing
estimates the full image's 28 px picture from it, and the fallback window its
sample (:mod:`batchscan.ingest.sampling`). That makes the band's size a matter of how much the
28 px picture needs, not of how alike a band and a box average are: the decoder goes down to
a short edge of :data:`OVERSAMPLED_EDGE` (8x the picture; three levels of a 2048 px image,
~9 ms instead of ~33 ms at two levels and ~550 ms in full), whether the window comes from the
header or from the pixels. Measured with ``jobs/experiments/reduced_decode_check.py --size 2048`` on
PneumoniaMNIST written as 2048 px DICOM (the level chosen on the val split, figures from the
test split's first 100 images), largest |score change| against the full decode, header
window / percentile window: lossless 0.0005 / 0.0015, lossy 0.0001 / 0.0006, HTJ2K
0.0005 / 0.0015; on all 624 test images, lossless 0.0011 / 0.0027. Resized as pixels (with
the grid offset and a filter matching a box's response, as before), the same three levels
gave 0.0059 with the header window. Four levels (128 px) gave 0.0018 / 0.0040 on val, too
close to the target to rely on (on test, looked at afterwards: 0.0018 / 0.0101).
"""

from __future__ import annotations

import io
import struct
from typing import Final

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import HTJ2K, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, JPEG2000Lossless

from batchscan.ingest.decoders.base import Decoded, reduction_level, syntax_of
from batchscan.ingest.sampling import LOW_PASS, Sampling, WaveletBand

NAME: Final = "pillow-openjpeg"
#: JPEG 2000 and High-Throughput JPEG 2000 (OpenJPEG 2.5 decodes both codestreams).
SYNTAXES: Final = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})
#: Smallest short edge (pixels) of the band: 8x the 28 px picture the preprocessing makes
#: (four levels, 4.6x, came within 0.001 of the 0.005 agreement on val; module doc).
OVERSAMPLED_EDGE: Final = 224


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


def _codestream_facts(frame: bytes) -> tuple[int, int, int, bool, int, int] | None:
    """(width, height, precision, signed, levels, transform) from the SIZ and COD markers
    (transform 1: 5/3 reversible wavelet, 0: 9/7 irreversible), or None."""
    siz = frame.find(_SIZ, 0, 256)
    cod = frame.find(_COD, 0, 4096)
    if siz < 0 or cod < 0 or len(frame) < max(siz + 43, cod + 14):
        return None
    width, height, x_offset, y_offset = struct.unpack(">IIII", frame[siz + 6 : siz + 22])
    components = struct.unpack(">H", frame[siz + 38 : siz + 40])[0]
    if components != 1 or x_offset or y_offset:
        return None
    ssiz = frame[siz + 40]
    levels, transform = frame[cod + 9], frame[cod + 13]
    return width, height, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), levels, transform


def _pillow_agrees(size: int, level: int) -> bool:
    """Whether Pillow's rounded size equals OpenJPEG's ceiling at `level`."""
    power = 1 << level
    return int((size + (power >> 1)) / power) == -(-size // power)


def decode(frame: bytes | None, ds: Dataset, level: int) -> Decoded | None:
    """Decode `frame` at 1 / 2**r of its size, r the largest number of levels whose short
    edge stays >= :data:`OVERSAMPLED_EDGE` (or `level`, if larger) and that Pillow sizes as
    OpenJPEG does.

    Returns stored values (the dtype pydicom would give), r and their sampling (a
    :class:`~batchscan.ingest.sampling.WaveletBand`); None when no level > 0 is usable (signed
    data, several components, image offsets, a precision over 16 bits, a wavelet other
    than JPEG 2000's two, a size other than the header's, a band too large to estimate
    from: :meth:`~batchscan.ingest.sampling.Sampling.estimable`).
    """
    from PIL import Image

    if frame is None or level == 0:  # level 0: full resolution asked for
        return None
    facts = _codestream_facts(frame)
    if facts is None:
        return None
    width, height, precision, signed, levels, transform = facts
    if signed or precision > 16 or transform not in LOW_PASS:
        return None
    if (height, width) != (int(ds.Rows), int(ds.Columns)):  # the header's size is the one
        return None  # checked against the pixel cap: pydicom decides
    usable = min(max(level, reduction_level(height, width, OVERSAMPLED_EDGE)), levels)
    while usable > 0 and not (_pillow_agrees(width, usable) and _pillow_agrees(height, usable)):
        usable -= 1
    sampling = Sampling((height, width), (WaveletBand(transform, usable),))
    if usable == 0 or not sampling.estimable():
        return None
    with Image.open(io.BytesIO(frame)) as picture:
        picture.reduce = usable  # Pillow's Jpeg2KImageFile setter: OpenJPEG's reduce factor
        picture.load()
        values = np.asarray(picture)
    if values.dtype != np.uint8:
        values = values.astype(np.uint16, copy=False)
        if picture.mode.startswith("I;16") and precision < 16:
            values = values >> (16 - precision)
    return Decoded(values, usable, sampling, NAME)
