"""Decode and display-normalize: stored DICOM pixels -> a 2-D float32 picture in [0, 1].

Decoding uses pydicom's pixel backends only (with the pylibjpeg, pyjpegls and Pillow plugins
installed by batchscan); no codec is written here. Which transfer syntaxes work is whatever
``pydicom.pixels.decoders.base.get_decoder(uid).is_available`` says on this install;
anything else is ``failed: unsupported_transfer_syntax:<uid>``.

Display normalization turns stored values into what a radiologist's viewer would show,
because the training pictures were display images (exported JPEGs):

1. pydicom's decoder already masks the bits above BitsStored and sign-extends signed pixels.
2. Modality LUT (Rescale Slope/Intercept or the Modality LUT Sequence), by pydicom. A
   Modality LUT Sequence that cannot be applied (an empty item, as LEADTOOLS writes) is
   ignored as DCMTK does: Rescale Slope/Intercept if present, else identity; which one was
   used is recorded (``modality_source``, as ``voi_source`` records the VOI).
3. VOI LUT, by pydicom: the VOI LUT Sequence if present (LUT Data as US or OW, which every
   Implicit VR file gives), else the *first* window
   (Window Center/Width, with the VOI LUT Function). **Fallback** when neither exists or the
   window is invalid: a linear window from the 0.5th to the 99.5th percentile of the
   image's stored values (robust to burnt-in labels and dead pixels), taken from the image
   resized to a short edge of 64 px so that it does not depend on pixel count. Pixel padding
   stays in that sample, as it stays in DCMTK's histogram window (``dcm2pnm +Wh 1``, the
   same 0.5/99.5 percentiles): measured with DCMTK 3.6.7, its window is the same with and
   without Pixel Padding Value, and on a padded CT its low end is the padding value. Leaving
   padding out moved such a CT's display (NEMA WG04 CT1: median 0.82 -> 0.56 against DCMTK).
4. Scaling of the VOI output range to [0, 1]; MONOCHROME1 is inverted (1 - x), so 0 is
   always black.
5. Pixel padding (Pixel Padding Value, up to Pixel Padding Range Limit) is shown black.

For integer images steps 2-5 are computed once per distinct stored value and applied as one
table lookup: the same result as applying them pixel by pixel, at a fraction of the cost.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.pixels.decoders.base import get_decoder

from batchscan.ingest.decoders import box_reduce, decode_frame, reduction_level
from batchscan.ingest.header import (
    HeaderError,
    StageOptions,
    declared_pixel_bytes,
    header_problem,
    os_failure,
    parse_file,
)
from batchscan.ingest.records import INTERPRETER_EXITS, ImageRecord
from batchscan.ingest.sampling import Box, Sampling, resize

#: Percentiles of the fallback window (used when the file has no VOI LUT and no window).
FALLBACK_PERCENTILES: Final = (0.5, 99.5)
#: Short edge (pixels) of the resized image the fallback percentiles are taken from.
FALLBACK_WINDOW_EDGE: Final = 64
#: Integer images whose value range exceeds this use the direct (non-LUT) path.
_MAX_LUT_ENTRIES: Final = 1 << 20


class DecodeError(Exception):
    """A file's pixels could not be turned into a display image.

    Attributes
    ----------
    reason:
        The machine-readable reason recorded in the report.
    """

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DisplayImage:
    """A display-normalized picture: float32 in [0, 1], 0 = black, how it was windowed, by
    which power of two it was reduced when decoded (1 = full resolution), and what its
    samples are (for :func:`batchscan.ingest.preprocess.preprocess`; None: pixels)."""

    pixels: np.ndarray
    voi_source: str
    scale: int = 1
    sampling: Sampling | None = None
    modality_source: str = "identity"
    decoder: str = ""


def read_dataset(path: str | bytes) -> Dataset:
    """Read a whole DICOM file, or its bytes (header and pixels); raw datasets without
    preamble too (:func:`batchscan.ingest.header.parse_file`)."""
    try:
        return parse_file(path, stop_before_pixels=False)
    except InvalidDicomError as exc:
        raise DecodeError("not_dicom") from exc
    except HeaderError as exc:
        raise DecodeError(exc.reason, exc.detail) from exc


def check_decodable(ds: Dataset) -> None:
    """Refuse, before decoding, what cannot or must not be decoded.

    Raises
    ------
    DecodeError
        ``no_pixel_data``, ``unsupported:float_pixel_data``,
        ``unsupported_transfer_syntax:<uid>``, ``bad_header:<field>``.
    """
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DecodeError("unsupported:float_pixel_data")
        raise DecodeError("no_pixel_data")
    meta = getattr(ds, "file_meta", None)
    uid = str(meta.get("TransferSyntaxUID", "") if meta is not None else "") or None
    if uid is None:
        # A raw dataset without file meta: pydicom guessed the encoding while reading.
        uid = (
            pydicom.uid.ImplicitVRLittleEndian
            if ds.original_encoding[0]
            else pydicom.uid.ExplicitVRLittleEndian
        )
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = uid
    try:
        decoder = get_decoder(uid)
    except (NotImplementedError, ValueError) as exc:
        raise DecodeError(f"unsupported_transfer_syntax:{uid}", str(exc)) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise DecodeError(f"unsupported_transfer_syntax:{uid}", f"no decoder plugin: {missing}")
    problem = header_problem(ds)
    if problem is not None:
        raise DecodeError(*problem)


#: The reasons :func:`_decode_failure_reason` gives a decoder's exception: pixel data shorter
#: than the header says, or ``decode_error:`` and what failed (``codec``, the exception type).
TRUNCATED_PIXEL_DATA: Final = "truncated_pixel_data"
DECODE_ERROR: Final = "decode_error:"


def _decode_failure_reason(exc: BaseException) -> str:
    """A precise reason for the common decode failures, the exception type otherwise."""
    message = str(exc)
    if "less than expected" in message or "doesn't match the expected length" in message:
        return TRUNCATED_PIXEL_DATA
    if "exceptions were raised by all available plugins" in message:
        return f"{DECODE_ERROR}codec"
    return f"{DECODE_ERROR}{type(exc).__name__}"


class Pixels(NamedTuple):
    """Stored values of one frame as the normalization gets them: reduced by `scale` (a
    power of two; 1 = full resolution), their `sampling` and the `decoder` that read them."""

    values: np.ndarray
    scale: int
    sampling: Sampling
    decoder: str


def decode_pixels(ds: Dataset, min_edge: int | None = None) -> Pixels:
    """The stored values of a single-frame grayscale image, their scale, sampling and
    decoder.

    With `min_edge`, the image comes back reduced by a power of two (the scale) to the
    smallest size whose short edge is still >= `min_edge`: decoded at that resolution by a
    codec that can (:mod:`batchscan.ingest.decoders`), else decoded in full and box averaged.
    Without it, the image is decoded at full resolution (scale 1). The sampling says what
    the values are made of (see :mod:`batchscan.ingest.sampling`), for the preprocessing.

    Raises
    ------
    DecodeError
        ``truncated_pixel_data``, ``decode_error:<what>`` when the backend fails,
        ``decode_error:shape`` when the result is not one 2-D frame; and the refusals of
        :func:`check_decodable`.
    """
    check_decodable(ds)
    try:
        arr, level, sampling, decoder = decode_frame(ds, min_edge)
    except DecodeError:
        raise
    except INTERPRETER_EXITS:
        raise
    except BaseException as exc:  # ValueError, RuntimeError, OSError, a codec's panic...
        raise DecodeError(_decode_failure_reason(exc), str(exc)) from exc
    if arr.ndim != 2:
        raise DecodeError("decode_error:shape", f"decoded shape {arr.shape}, expected 2-D")
    if min_edge:
        target = reduction_level(arr.shape[0] << level, arr.shape[1] << level, min_edge)
        if target > level:
            factor = 1 << (target - level)
            arr, level = box_reduce(arr, factor), target
            sampling = sampling.then(Box(factor))
    return Pixels(arr, 1 << level, sampling, decoder)


def _padding_values(ds: Dataset) -> tuple[float, float] | None:
    """The closed range of stored values marked as padding, or None."""
    value = ds.get("PixelPaddingValue")
    if value is None or isinstance(value, bytes | bytearray):
        return None
    limit = ds.get("PixelPaddingRangeLimit", value)
    if isinstance(limit, bytes | bytearray):
        limit = value
    low, high = sorted((float(value), float(limit)))
    return low, high


#: What a header value that pydicom cannot use raises.
_BAD_VALUE: Final = (ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error)


def lut_entries(item: Dataset, ds: Dataset) -> np.ndarray:
    """The LUT Data of a LUT item as numbers, whether read as US (a list) or OW (bytes, in
    the data set's byte order: the VR is "US or OW" and Implicit VR files give OW)."""
    data = item.LUTData
    if isinstance(data, bytes | bytearray):
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        little = syntax.is_little_endian if syntax is not None else ds.original_encoding[1]
        usable = len(data) // 2 * 2
        return np.frombuffer(data[:usable], dtype="<u2" if little in (True, None) else ">u2")
    if isinstance(data, int | float):
        return np.asarray([data], dtype=np.float64)
    return np.asarray(list(data), dtype=np.float64)


def modality_transform(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    """Stored values -> modality values (float64) and which transform made them:
    ``modality_lut``, ``rescale`` or ``identity``; ``rescale:lut_invalid`` /
    ``identity:lut_invalid`` when a Modality LUT Sequence was present but unusable."""
    suffix = ""
    if ds.get("ModalityLUTSequence"):
        try:
            return np.asarray(apply_modality_lut(values, ds), dtype=np.float64), "modality_lut"
        except _BAD_VALUE:
            suffix = ":lut_invalid"
    try:
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is not None and intercept is not None:
            slope, intercept = float(slope), float(intercept)
            if np.isfinite(slope) and np.isfinite(intercept) and slope != 0.0:
                out = np.asarray(values, dtype=np.float64) * slope + intercept
                return out, "rescale" + suffix
    except _BAD_VALUE:
        pass
    return np.asarray(values, dtype=np.float64), "identity" + suffix


def _voi_range(ds: Dataset) -> tuple[float, float, str] | None:
    """Output range and name of the VOI transform pydicom will apply, or None if none."""
    sequence = ds.get("VOILUTSequence")
    if sequence:
        item = sequence[0]
        bits = int(item.LUTDescriptor[2])
        data = lut_entries(item, ds) if "LUTData" in item else np.zeros(0)
        top = float(2**bits - 1)
        if data.size and data.max() > top:  # descriptors that understate the LUT's depth
            top = float(2 ** int(data.max()).bit_length() - 1)
        return 0.0, top, "voi_lut"
    if "WindowCenter" in ds and "WindowWidth" in ds:
        with np.errstate(over="ignore"):
            probe = apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0, prefer_lut=True)
        low, high = float(probe[0]), float(probe[1])
        if not high > low:
            return None
        return low, high, "window"
    return None


def _display_lut(
    values: np.ndarray,
    padding: np.ndarray,
    ds: Dataset,
    fallback_window: Callable[[np.ndarray], tuple[float, float]],
) -> tuple[np.ndarray, str, str]:
    """Display value in [0, 1] for each stored value in `values` (same shape), the VOI
    source and the modality source.

    `fallback_window` maps the modality LUT (as a function of stored values) to the
    percentile window; it is only called when the file has no usable VOI.
    """
    modality, modality_source = modality_transform(values, ds)
    voi = None
    try:
        voi = _voi_range(ds)
        if voi is not None:
            out = np.asarray(apply_voi_lut(modality, ds, index=0, prefer_lut=True), np.float64)
            low, high, source = voi
            display = (out - low) / (high - low)
    except _BAD_VALUE:
        voi = None  # an invalid window or LUT: fall back as documented
    if voi is None:
        low, high = fallback_window(modality)
        display = (modality - low) / (float(high - low) or 1.0)
        source = "percentile"
    display = np.clip(display, 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        display = 1.0 - display
    display[padding] = 0.0
    return display.astype(np.float32), source, modality_source


def window_sample(arr: np.ndarray, sampling: Sampling | None = None) -> np.ndarray:
    """The image resized (Pillow BICUBIC, antialiased) to a short edge of
    :data:`FALLBACK_WINDOW_EDGE` pixels, float64, clipped to the range of `arr`; flattened.

    The fallback window is taken from this, not from the pixels themselves, so that it
    depends on the anatomy and not on the pixel count: at full resolution detector noise
    widens the extreme percentiles, and a 4000-px and a 2000-px detector (or a full and a
    reduced decode) would otherwise get different contrast for the same picture. A smooth
    resize rather than a box average because the same sample must come out of a wavelet band
    (`sampling`; estimated, :func:`batchscan.ingest.sampling.resize`): the band cannot say where a
    box's edges cut, and on the test split written as 2048 px JPEG 2000 the band's estimate of
    a box sample moved the window by up to 0.43 % of its width, of this one by 0.18 %. Pixel
    padding is part of the sample (module docstring, step 3).
    """
    if arr.ndim != 2 or min(arr.shape) <= FALLBACK_WINDOW_EDGE:
        return arr.astype(np.float64).ravel()
    rows, columns = sampling.shape if sampling is not None else arr.shape
    short = min(rows, columns)
    size = (
        max(1, round(rows * FALLBACK_WINDOW_EDGE / short)),
        max(1, round(columns * FALLBACK_WINDOW_EDGE / short)),
    )
    sample = resize(arr, size, sampling).astype(np.float64)
    # the resize's overshoot at edges stays within what the image holds
    np.clip(sample, arr.min(), arr.max(), out=sample)
    return sample.ravel()


def normalize(arr: np.ndarray, ds: Dataset, sampling: Sampling | None = None) -> DisplayImage:
    """Apply modality LUT, VOI LUT, MONOCHROME1 inversion and padding (see module doc).

    Parameters
    ----------
    arr:
        Stored pixel values of one frame, as :func:`decode_pixels` returns them.
    ds:
        The image's dataset (its Modality LUT, VOI LUT and Image Pixel modules).
    sampling:
        What `arr` is made of (:func:`decode_pixels`); None for pixels.

    Returns
    -------
    DisplayImage
    """
    pad = _padding_values(ds)

    def is_padding(stored: np.ndarray) -> np.ndarray:
        if pad is None:
            return np.zeros(stored.shape, dtype=bool)
        return (stored >= pad[0]) & (stored <= pad[1])

    def sample() -> np.ndarray:  # only when the window comes from the pixels
        return window_sample(arr, sampling)

    if arr.dtype.kind in "iu" and arr.size:
        low, high = int(arr.min()), int(arr.max())
        if high - low < _MAX_LUT_ENTRIES:
            values = np.arange(low, high + 1, dtype=np.int64)
            index = np.subtract(arr, low, dtype=np.int64 if arr.dtype.itemsize > 2 else np.int32)
            padding = is_padding(values)

            def from_histogram(modality: np.ndarray) -> tuple[float, float]:
                # the sample unrounded, through the modality table interpolated: the window
                # is then a continuous function of the sample, so two decodes whose samples
                # differ a little get windows that differ as little (rounding to stored
                # values made an 8-bit window jump by a whole grey level)
                mapped = np.interp(sample(), values, modality)
                low_v, high_v = np.percentile(mapped, FALLBACK_PERCENTILES)
                return float(low_v), float(high_v)

            lut, source, modality_source = _display_lut(values, padding, ds, from_histogram)
            return DisplayImage(
                pixels=lut[index], voi_source=source, modality_source=modality_source
            )
    values = arr.astype(np.float64)

    def from_sample(_: np.ndarray) -> tuple[float, float]:
        values = sample()
        if arr.dtype.kind in "iu":  # stored values, as a Modality LUT indexes them
            values = np.rint(values).astype(np.int64)
        if not values.size:
            return 0.0, 1.0
        modality = modality_transform(values, ds)[0]
        low_v, high_v = np.percentile(modality, FALLBACK_PERCENTILES)
        return float(low_v), float(high_v)

    pixels, source, modality_source = _display_lut(values, is_padding(values), ds, from_sample)
    return DisplayImage(pixels=pixels, voi_source=source, modality_source=modality_source)


def display_image_of(ds: Dataset, min_edge: int | None = None) -> DisplayImage:
    """Decode (reduced to `min_edge`, see :func:`decode_pixels`) and normalize one dataset.

    Raises
    ------
    DecodeError
    """
    arr, scale, sampling, decoder = decode_pixels(ds, min_edge)
    try:
        image = normalize(arr, ds, sampling)
    except Exception as exc:  # a LUT or value that pydicom cannot apply
        raise DecodeError(f"normalize_error:{type(exc).__name__}", str(exc)) from exc
    return DisplayImage(
        pixels=image.pixels,
        voi_source=image.voi_source,
        scale=scale,
        sampling=sampling,
        modality_source=image.modality_source,
        decoder=decoder,
    )


def read_display_image(path: str, min_edge: int | None = None) -> DisplayImage:
    """Read a DICOM file and return its display picture (training folders, tests, jobs).

    Raises
    ------
    DecodeError
        With the same reasons the scan job records.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = read_dataset(str(path))
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(f"read_error:{type(exc).__name__}", str(exc)) from exc
        return display_image_of(ds, min_edge)


def decode_record(
    record: ImageRecord, options: StageOptions, content: bytes | None = None
) -> DisplayImage | None:
    """Decode stage for one eligible record; on failure the record says why and None returns.

    The declared size is checked again on the full dataset before any pixel is decoded.
    `content` is the file's bytes when they were fetched rather than read from ``abs_path``.
    """
    if not record.pending:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = read_dataset(record.abs_path if content is None else content)
            declared = declared_pixel_bytes(ds)
            if declared is not None and declared > options.max_pixel_bytes:
                raise DecodeError("too_large", f"declares {declared} bytes of pixels")
            image = display_image_of(ds, options.min_edge)
        except DecodeError as exc:
            record.fail(exc.reason, exc.detail)
            return None
        except OSError as exc:
            record.fail(*os_failure(exc, "read_error"))
            return None
        except Exception as exc:  # anything pydicom raises on a broken file
            record.fail(f"read_error:{type(exc).__name__}", str(exc))
            return None
    record.voi_source = image.voi_source
    record.modality_source = image.modality_source
    record.decoder = image.decoder
    record.decode_scale = image.scale
    return image
