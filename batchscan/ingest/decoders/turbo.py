"""JPEG (baseline, extended 12-bit, lossless process 14 and SV1) through libjpeg-turbo 3.

libjpeg-turbo 3 decodes every JPEG process a radiograph uses, through ``imagecodecs``:

* **speed**: a 2048 x 2048 12-bit lossless SV1 frame takes ~27 ms against ~158 ms in
  pylibjpeg-libjpeg (pydicom's default), with the same pixels (lossless: exact, tested on
  pydicom's and pydicom-data's files and on files encoded here);
* **tolerance**: 12-bit JPEG extended files whose scan header says Se=0 instead of 63 (the
  NEMA WG04 ``*_JPLY`` images, CR chest radiographs among them) are refused by
  pylibjpeg-libjpeg (error -1038) and by GDCM 3.2 ("unsupported JPEG data precision 12"),
  and decoded by libjpeg-turbo, as DCMTK does with a warning.

Full resolution only (``imagecodecs`` exposes no DCT scaling); 8-bit baseline frames are
first offered to :mod:`batchscan.ingest.decoders.jpeg`, whose Pillow route scales in the IDCT.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
)

from batchscan.ingest.decoders.base import Decoded, full_resolution, syntax_of

NAME: Final = "libjpeg-turbo"
SYNTAXES: Final = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1})


def is_available(ds: Dataset) -> bool:
    """True for a single-sample JPEG image when imagecodecs has its libjpeg-turbo codec."""
    if syntax_of(ds) not in SYNTAXES:
        return False
    try:
        import imagecodecs

        return bool(imagecodecs.JPEG8.available) and int(ds.SamplesPerPixel) == 1
    except Exception:  # not installed, or a header value that is no number
        return False


#: Start-of-frame markers of the JPEG processes (baseline to lossless, Huffman coded).
_SOF: Final = (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2", b"\xff\xc3")


def _precision(frame: bytes) -> int:
    """Sample precision from the frame header (SOF marker), 16 when it cannot be found: a
    frame of P bits cannot hold values above Bits Stored when P <= Bits Stored, and then the
    8 MB mask of a 2048 px image is skipped."""
    for marker in _SOF:
        at = frame.find(marker, 0, 4096)
        if at >= 0 and at + 4 < len(frame):
            return frame[at + 4]
    return 16


def decode(frame: bytes | None, ds: Dataset, level: int) -> Decoded | None:
    """The stored values of `frame` at full resolution (level 0), as pydicom would give them
    (signed when Pixel Representation is 1); None when the frame is not what the header
    says (another size, colour), so that the next decoder decides."""
    import imagecodecs

    if frame is None:
        return None
    values = imagecodecs.jpeg8_decode(frame)
    if values.ndim != 2 or values.shape != (int(ds.Rows), int(ds.Columns)):
        return None
    width = values.dtype.itemsize * 8
    bits = int(ds.get("BitsStored", width) or width)
    if 0 < bits < min(width, _precision(frame)):  # bits above Bits Stored are not pixels
        np.bitwise_and(values, (1 << bits) - 1, out=values)  # (pydicom masks them too)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        signed = values.astype(np.int32)
        if 0 < bits <= width:
            signed = np.where(signed >= 1 << (bits - 1), signed - (1 << bits), signed)
        values = signed.astype(np.int16 if width == 16 else np.int8)
    return full_resolution(values, NAME)
