"""Header pass: read each candidate's DICOM header (never its pixels) and decide eligibility.

Most files in a hospital archive are not chest radiographs (CT slices, MR, reports, key
objects), so deciding from the header alone, with ``stop_before_pixels``, keeps the pixels of
skipped files unread. Every decision is a value on the record:

* ``not_dicom``: no DICOM preamble and no recognisable DICOM start
* ``dicomdir``: a DICOMDIR media index, not an image
* ``not_an_image``: a DICOM object without an image (SR, KO, PR, RT plan...)
* ``modality:<M>``: default mode: modality is not CR or DX (``unknown`` when absent)
* ``body_part:<B>``: default mode: not a chest (``unknown`` when neither BodyPartExamined
  nor any description names the chest)
* ``view:<V>``: default mode: not a frontal view (``LL``, ``RL``, ``LAT``...)
* ``color:<P>``: not a grayscale image (Photometric Interpretation P)
* ``multiframe:<n>``: n > 1 frames: a cine or volume, not one radiograph
* ``for_processing``: default mode: a DX "for processing" (raw detector) image
* ``truncated_header``: (failed) ``DICM`` and then nothing, or only the file meta
* ``header_error:<E>``: (failed) the header could not be parsed (exception E; an OSError
  that pydicom raises without an errno is the file's content too)
* ``bad_header:<what>``: (failed) ``rows_columns``, ``frames``, ``bits_allocated``,
  ``bits_stored``, ``photometric``, ``samples_per_pixel``: values no real image has;
  ``no_image_module``: an image SOP class without Rows/Columns (cut off in its header);
  ``no_sop_class``: neither an image nor a SOP Class UID; ``no_data_set``: what follows
  ``DICM`` cannot start a data set
* ``too_large``: (failed) declared pixel data above the cap (``max_pixel_bytes``)

The rules for ``--all-modalities`` (``StageOptions.all_modalities``): every single-frame
grayscale image (MONOCHROME1/2, one sample per pixel) of any modality is eligible, views
included; colour images (RGB, YBR, PALETTE COLOR) and multi-frame objects are skipped because
they cannot be the 2-D grayscale picture the model was trained on.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, BinaryIO, Final

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from batchscan.ingest.decoders import DEFAULT_MIN_EDGE
from batchscan.ingest.paths import open_binary
from batchscan.ingest.records import ImageRecord

if TYPE_CHECKING:  # the domain stage comes after this one; only its type is named here
    from batchscan.ingest.domain import Domain

#: Media Storage Directory Storage: the SOP class of a DICOMDIR.
DICOMDIR_SOP_CLASS: Final = "1.2.840.10008.1.3.10"
#: Modality by SOP class, for files that lack (0008,0060) Modality.
SOP_CLASS_MODALITY: Final = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX",
    "1.2.840.10008.5.1.4.1.1.1.2": "MG",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "MG",
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.6.1": "US",
}
#: DX "for processing" SOP class: raw detector data that is not meant to be looked at.
FOR_PROCESSING_SOP_CLASSES: Final = frozenset({"1.2.840.10008.5.1.4.1.1.1.1.1"})
RADIOGRAPH_MODALITIES: Final = frozenset({"CR", "DX"})
FRONTAL_VIEWS: Final = frozenset({"PA", "AP"})
GRAYSCALE: Final = frozenset({"MONOCHROME1", "MONOCHROME2"})
#: Photometric Interpretation values the standard defines (PS3.3 C.7.6.3.1.2), as tokens.
PHOTOMETRIC: Final = GRAYSCALE | frozenset(
    {
        "PALETTE_COLOR",
        "RGB",
        "HSV",
        "ARGB",
        "CMYK",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_PARTIAL_422",
        "YBR_PARTIAL_420",
        "YBR_ICT",
        "YBR_RCT",
        "XYB",
    }
)

#: Words that name the chest in BodyPartExamined or a description, in the languages met in
#: European and American archives.
_CHEST_WORDS: Final = re.compile(r"CHEST|THORA|THX|LUNG|CXR|T[OÓ]RAX|TORACE|PULMO|POUMON|BRUST")
#: View words in free-text descriptions; order matters (lateral words before ``AP``/``PA``).
_VIEW_WORDS: Final = (
    (re.compile(r"\b(LATERAL|LAT|SEITLICH)\b"), "LAT"),
    (re.compile(r"\bLL\b"), "LL"),
    (re.compile(r"\bRL\b"), "RL"),
    (re.compile(r"\b(PA|P\.A\.|POSTERO-?ANTERIOR)\b"), "PA"),
    (re.compile(r"\b(AP|A\.P\.|ANTERO-?POSTERIOR)\b"), "AP"),
)
_CODE_MEANING_VIEWS: Final = (
    ("POSTERO-ANTERIOR", "PA"),
    ("POSTEROANTERIOR", "PA"),
    ("ANTERO-POSTERIOR", "AP"),
    ("ANTEROPOSTERIOR", "AP"),
    ("LEFT LATERAL", "LL"),
    ("RIGHT LATERAL", "RL"),
    ("LATERAL", "LAT"),
)
_DESCRIPTIONS: Final = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
)
_TOKEN: Final = re.compile(r"[^A-Z0-9_.\-]+")

#: Default cap on declared pixel bytes (rows x columns x frames x samples x bytes): 512 MiB.
DEFAULT_MAX_PIXEL_BYTES: Final = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StageOptions:
    """Options of the per-file stages (header, decode), passed as one typed object.

    Attributes
    ----------
    all_modalities:
        Score every single-frame grayscale image, not only frontal chest radiographs.
    max_pixel_bytes:
        Refuse (``failed: too_large``) any image whose declared pixel data is larger.
    min_edge:
        Decode images down to this short edge (by powers of two) before normalizing, see
        :mod:`batchscan.ingest.decoders`; None decodes and normalizes at full resolution.
    pseudonym_key:
        The site's pseudonymisation key: when set, each record gets ``patient_key``, the
        HMAC-SHA256 of its PatientID (see :func:`patient_key`); when None nothing about the
        patient is read.
    blank_gate:
        The image sanity gate (:mod:`batchscan.ingest.sanity`): a blank picture (constant, or noise
        only) is ``skipped: blank_image``; False scores every picture.
    domain:
        The model card's training domain, which each image is judged against
        (:mod:`batchscan.ingest.domain`); None judges nothing.
    skip_out_of_domain:
        ``--out-of-domain skip``: an image outside the domain is skipped, not scored.
    """

    all_modalities: bool = False
    max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES
    min_edge: int | None = DEFAULT_MIN_EDGE
    pseudonym_key: bytes | None = field(default=None, repr=False)
    blank_gate: bool = False
    domain: Domain | None = None
    skip_out_of_domain: bool = False


def patient_key(patient_id: str, key: bytes) -> str | None:
    """HMAC-SHA256 of a PatientID (hex), stable across runs for the same key; None when the
    file has no PatientID. Without the key the PatientID cannot be recovered or guessed by
    hashing candidate IDs, which a plain hash would allow."""
    if not patient_id:
        return None
    return hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()


def token(value: Any, default: str = "unknown", limit: int = 24) -> str:
    """A reason-safe token from a header value: upper case, no spaces, bounded length."""
    text = _TOKEN.sub("_", str(value).strip().upper()).strip("_") if value is not None else ""
    return text[:limit] or default


def _text(ds: Dataset, keyword: str) -> str:
    """A header string value, '' when absent or unreadable."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value that pydicom cannot convert
        return ""
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    return str(value).strip()


#: Elements of which a forced read (no preamble) must find at least one to count as DICOM.
_IDENTITY_KEYWORDS: Final = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Modality")
#: Bytes read to recognise a file.
HEAD_BYTES: Final = 1024


def looks_like_dicom(head: bytes) -> bool | None:
    """True for a Part 10 file (``DICM`` at 128), None for a possible raw dataset, else False.

    Old ACR-NEMA style files have no preamble: they start with a group 0x0002 or 0x0008
    element (either byte order) or carry the DICOM UID root early. Those are read with
    ``force=True`` and must then show DICOM identity elements; anything else is not DICOM,
    without pydicom ever parsing it.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) >= 8 and (
        head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
        or b"1.2.840.10008." in head
    ):
        return None
    return False


class HeaderError(Exception):
    """A file that says it is DICOM (``DICM`` at byte 128) but cannot hold a data set,
    found from its first bytes, before pydicom parses anything.

    Attributes
    ----------
    reason:
        ``truncated_header`` or ``bad_header:no_data_set``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


#: Explicit VR codes whose length field is 4 bytes (after 2 reserved bytes), PS3.5 7.1.2.
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}
)
#: First tags a data set may start with right after ``DICM``: the file meta group (0002),
#: or, from writers that leave the meta out, the identifying group 0008 in either byte order.
_FIRST_GROUPS: Final = (b"\x02\x00", b"\x08\x00", b"\x00\x08")


def _meta_end(head: bytes) -> int | None:
    """Where the file meta group ends by its (0002,0000) group length, or None."""
    if head[132:138] != b"\x02\x00\x00\x00UL" or len(head) < 144:
        return None
    return 144 + struct.unpack("<I", head[140:144])[0]


def part10_problem(head: bytes, size: int) -> tuple[str, str] | None:
    """(reason, detail) when a file with ``DICM`` at 128 cannot hold a data set, else None.

    Checked on the first bytes, so that a cut-off transfer (nothing after ``DICM``) is a
    failure rather than an object without an image, and a 2 GiB file of zeros after
    ``DICM`` fails at once instead of costing a worker its whole file timeout.
    """
    if size < 140:
        return "truncated_header", f"{size} bytes: the file ends after the DICM prefix"
    if head[132:134] not in _FIRST_GROUPS:
        group, element = struct.unpack("<HH", head[132:136])
        return (
            "bad_header:no_data_set",
            f"no DICOM element after DICM (tag ({group:04X},{element:04X}))",
        )
    end = _meta_end(head)
    if end is not None:
        if size <= end:
            return "truncated_header", "the file ends after its file meta information"
        if end + 8 <= len(head) and head[end : end + 4] == b"\0\0\0\0":
            return "bad_header:no_data_set", "zero bytes where the data set should start"
    return None


def _drop_stray_meta(data: bytes, end: int) -> bytes:
    """`data` without group 0002 elements that follow the file meta group's declared end.

    pydicom reads group 0002 elements for as long as they come and lets a stray Transfer
    Syntax UID there replace the real one; the group length says where the file meta ends
    and it is authoritative (PS3.10 7.1), as in DCMTK and GDCM.
    """
    position = end
    while data[position : position + 2] == b"\x02\x00" and position + 8 <= len(data):
        vr = data[position + 4 : position + 6]
        if vr in _LONG_VRS:
            length = struct.unpack("<I", data[position + 8 : position + 12])[0]
            position += 12 + length
        else:
            position += 8 + struct.unpack("<H", data[position + 6 : position + 8])[0]
    return data[:end] + data[position:]


def parse_file(path: str | bytes, *, stop_before_pixels: bool) -> Dataset:
    """Read a DICOM file (without its pixels when `stop_before_pixels`), whatever its path;
    `path` may also be the file's bytes (an instance fetched from a PACS), which are then
    read exactly as the file would be.

    Part 10 files are checked first (:func:`part10_problem`) and their file meta group is
    taken as its group length bounds it (:func:`_drop_stray_meta`). Files without a preamble
    (old ACR-NEMA style) are read with ``force`` and must show DICOM identity elements.

    Raises
    ------
    pydicom.errors.InvalidDicomError
        If the file is not DICOM.
    HeaderError
        If it says it is DICOM but holds no data set.
    Exception
        Whatever pydicom raises for a broken file (callers record it).
    """
    in_memory = isinstance(path, bytes)
    with io.BytesIO(path) if in_memory else open_binary(path) as handle:
        head = handle.read(HEAD_BYTES)
        kind = looks_like_dicom(head)
        if kind is False:
            raise InvalidDicomError("no DICOM preamble and no DICOM element at the start")
        handle.seek(0)
        if kind:
            size = len(path) if in_memory else os.fstat(handle.fileno()).st_size
            problem = part10_problem(head, size)
            if problem is not None:
                raise HeaderError(*problem)
            end = _meta_end(head)
            source: BinaryIO = handle
            if end is not None and head[end : end + 2] == b"\x02\x00":
                source = io.BytesIO(_drop_stray_meta(handle.read(), end))
            return pydicom.dcmread(source, stop_before_pixels=stop_before_pixels)
        try:
            ds = pydicom.dcmread(handle, stop_before_pixels=stop_before_pixels, force=True)
        except Exception as exc:  # not parseable without a preamble: not DICOM
            raise InvalidDicomError(f"no preamble and unreadable as a dataset: {exc}") from exc
        if not any(keyword in ds for keyword in _IDENTITY_KEYWORDS):
            raise InvalidDicomError("no preamble and no DICOM identity elements")
        return ds


def read_dataset_header(path: str | bytes) -> Dataset:
    """Read a file's header (or its bytes') without its pixels (see :func:`parse_file`)."""
    return parse_file(path, stop_before_pixels=True)


def os_failure(exc: OSError, stage: str = "header_error") -> tuple[str, str]:
    """(reason, detail) for an OSError while reading a file in `stage` (``header_error``
    or ``read_error``).

    A real I/O error carries an errno and may pass (``unreadable``, tried again next run);
    pydicom also raises OSError without one for data it cannot parse (an undefined-length
    element it cannot find the end of): that is the file's content, a permanent failure.
    """
    if exc.errno is None:
        return f"{stage}:OSError", str(exc)
    return "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}"


def view_of(ds: Dataset) -> tuple[str, str | None]:
    """The projection of a radiograph and where it was read from.

    ViewPosition first, then the View Code Sequence, then the descriptions; ``unknown``
    (source None) when none of them says.
    """
    position = token(_text(ds, "ViewPosition"), default="")
    if position:
        return position, "ViewPosition"
    try:
        codes = ds.get("ViewCodeSequence") or []
        for item in codes:
            meaning = str(item.get("CodeMeaning", "")).upper()
            for words, view in _CODE_MEANING_VIEWS:
                if words in meaning:
                    return view, "ViewCodeSequence"
    except Exception:  # a broken sequence is just no information
        pass
    description = " ".join(
        _text(ds, k) for k in ("SeriesDescription", "ProtocolName", "StudyDescription")
    ).upper()
    for pattern, view in _VIEW_WORDS:
        if pattern.search(description):
            return view, "description"
    return "unknown", None


def is_chest(ds: Dataset, body_part: str) -> bool | None:
    """True/False from BodyPartExamined; when it is absent, from the descriptions (or None)."""
    if body_part:
        return bool(_CHEST_WORDS.search(body_part.upper()))
    text = " ".join(_text(ds, k) for k in _DESCRIPTIONS).upper()
    return True if _CHEST_WORDS.search(text) else None


def _fill_identity(record: ImageRecord, ds: Dataset) -> None:
    """Copy the UIDs and study facts the reports need (no patient identifiers)."""
    record.study_instance_uid = _text(ds, "StudyInstanceUID") or None
    record.series_instance_uid = _text(ds, "SeriesInstanceUID") or None
    record.sop_instance_uid = _text(ds, "SOPInstanceUID") or None
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(ds, "SOPClassUID") or (meta and _text(meta, "MediaStorageSOPClassUID"))
    record.sop_class_uid = sop_class or None
    record.transfer_syntax_uid = (meta and _text(meta, "TransferSyntaxUID")) or None
    record.accession_number = _text(ds, "AccessionNumber") or None
    record.study_date = iso_date(_text(ds, "StudyDate"))
    record.modality = token(_text(ds, "Modality"), default="") or SOP_CLASS_MODALITY.get(
        sop_class or "", None
    )
    record.body_part = token(_text(ds, "BodyPartExamined"), default="") or None
    record.patient_age_years = patient_age_years(ds)
    record.patient_sex = patient_sex(ds)
    record.manufacturer = _text(ds, "Manufacturer")[:64] or None
    record.manufacturer_model = _text(ds, "ManufacturerModelName")[:64] or None
    record.photometric = token(_text(ds, "PhotometricInterpretation"), default="") or None
    record.pixel_spacing_mm = pixel_spacing_mm(ds)


def pixel_spacing_mm(ds: Dataset) -> float | None:
    """The row spacing of the pixels in mm: PixelSpacing (calibrated to the patient), else
    ImagerPixelSpacing (at the detector, what CR and DX films mostly carry); None when
    neither holds a number a radiograph could have (0.01-5 mm), since a hostile or broken
    value must not become a drift monitor's category."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:  # _text: '' when absent or unreadable, the values joined by backslashes
            first = float(_text(ds, keyword).split("\\")[0])
        except ValueError:  # absent, empty or not a number
            continue
        if 0.01 <= first <= 5.0:
            return round(first, 4)
    return None


#: PatientAge units (PS3.5 Table 6.2-1, VR AS) in years.
_AGE_UNITS: Final = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
#: Ages at and above this are reported as this (as HIPAA's safe harbour groups them).
AGE_CAP: Final = 90.0
_AGE: Final = re.compile(r"^(\d{1,3})([DWMY])$")


def iso_date(value: str) -> str | None:
    """A DICOM date (DA ``YYYYMMDD``, or ACR-NEMA's ``YYYY.MM.DD``) as ISO ``YYYY-MM-DD``;
    None when absent or not a real date (reports type the column as a date, so a dashboard
    never has to cast or guess)."""
    digits = value.strip().replace(".", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()
    except ValueError:
        return None


def patient_sex(ds: Dataset) -> str | None:
    """PatientSex as ``M``, ``F`` or ``O``; None when absent or anything else."""
    value = _text(ds, "PatientSex").upper()
    return value if value in ("M", "F", "O") else None


def patient_age_years(ds: Dataset) -> float | None:
    """Age in years at the study: PatientAge (``018M``, ``045Y``...), else the years between
    PatientBirthDate and StudyDate (the birth date is read for this only, never kept);
    ages of 90 and over as 90; None when neither gives a plausible age."""
    match = _AGE.match(_text(ds, "PatientAge").upper())
    if match:
        age = int(match.group(1)) * _AGE_UNITS[match.group(2)]
    else:
        try:
            born = datetime.strptime(_text(ds, "PatientBirthDate")[:8], "%Y%m%d")
            seen = datetime.strptime(_text(ds, "StudyDate")[:8], "%Y%m%d")
        except ValueError:
            return None
        age = (seen - born).days / 365.25
    if not 0 <= age < 150:
        return None
    return round(min(age, AGE_CAP), 2)


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword, default)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def declared_pixel_bytes(ds: Dataset) -> int | None:
    """Rows x Columns x frames x samples x bytes per sample, or None if absurd/missing."""
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    frames = _int(ds, "NumberOfFrames", 1) or 1
    samples = _int(ds, "SamplesPerPixel", 1) or 1
    bits = _int(ds, "BitsAllocated")
    if rows is None or cols is None or bits is None:
        return None
    if rows <= 0 or cols <= 0 or frames <= 0 or samples <= 0 or bits <= 0:
        return None
    return rows * cols * frames * samples * max(bits // 8, 1)


def header_problem(ds: Dataset) -> tuple[str, str] | None:
    """(reason, detail) for an image header that cannot describe a real image, else None.

    Checked before any pixel is read, so that absurd values never reach a decoder.
    """
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows is None or cols is None or rows <= 0 or cols <= 0:
        return "bad_header:rows_columns", f"Rows {ds.get('Rows')!r}, Columns {ds.get('Columns')!r}"
    frames = _int(ds, "NumberOfFrames", 1)
    if frames is None or frames <= 0:
        return "bad_header:frames", f"NumberOfFrames {ds.get('NumberOfFrames')!r}"
    allocated = _int(ds, "BitsAllocated")
    if allocated not in (1, 8, 16, 32, 64):
        return "bad_header:bits_allocated", f"BitsAllocated {ds.get('BitsAllocated')!r}"
    stored = _int(ds, "BitsStored", allocated)
    if stored is None or not 0 < stored <= allocated:
        return "bad_header:bits_stored", f"BitsStored {stored} with BitsAllocated {allocated}"
    return None


def classify(record: ImageRecord, ds: Dataset, options: StageOptions) -> ImageRecord:
    """Decide eligibility of one parsed header; the record stays ``pending`` when eligible."""
    _fill_identity(record, ds)
    if options.pseudonym_key is not None:
        record.patient_key = patient_key(_text(ds, "PatientID"), options.pseudonym_key)
    meta = getattr(ds, "file_meta", None)
    if (meta is not None and _text(meta, "MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS) or (
        "DirectoryRecordSequence" in ds
    ):
        return record.skip("dicomdir")
    if not any(element.tag.group != 0x0002 for element in ds):
        return record.fail("truncated_header", "no data set after the file meta information")
    if "Rows" not in ds or "Columns" not in ds:
        if "SOPClassUID" not in ds:  # every DICOM object names its class: garbage or cut off
            return record.fail("bad_header:no_sop_class", "neither an image nor a SOP Class UID")
        name = UID(record.sop_class_uid).name if record.sop_class_uid else ""
        if "Image Storage" in name:  # an image object without its image: cut off or broken
            return record.fail("bad_header:no_image_module", f"{name} without Rows/Columns")
        return record.skip("not_an_image", name or None)

    record.rows, record.columns = _int(ds, "Rows"), _int(ds, "Columns")
    record.view, record.view_source = view_of(ds)
    if not options.all_modalities:
        modality = record.modality or "unknown"
        if modality not in RADIOGRAPH_MODALITIES:
            return record.skip(f"modality:{modality}")
        if record.sop_class_uid in FOR_PROCESSING_SOP_CLASSES:
            return record.skip("for_processing")
        chest = is_chest(ds, record.body_part or "")
        if not chest:
            return record.skip(f"body_part:{record.body_part or 'unknown'}")

    photometric = record.photometric or "unknown"  # read by _fill_identity, as token() has it
    if photometric not in PHOTOMETRIC:
        return record.fail("bad_header:photometric", f"Photometric Interpretation {photometric}")
    samples = _int(ds, "SamplesPerPixel", 1)
    if photometric not in GRAYSCALE:
        return record.skip(f"color:{photometric}")
    if samples != 1:
        return record.fail("bad_header:samples_per_pixel", f"{photometric} with {samples} samples")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames is not None and frames > 1:
        return record.skip(f"multiframe:{frames}")
    if not options.all_modalities and record.view not in FRONTAL_VIEWS | {"unknown"}:
        return record.skip(f"view:{record.view}")

    problem = header_problem(ds)
    if problem is not None:
        return record.fail(*problem)
    declared = declared_pixel_bytes(ds) or 0
    if declared > options.max_pixel_bytes:
        return record.fail(
            "too_large", f"declares {declared} bytes of pixels, cap {options.max_pixel_bytes}"
        )
    return record


def read_header(
    record: ImageRecord, options: StageOptions, content: bytes | None = None
) -> ImageRecord:
    """Header stage for one record: parse the header and classify it; never raises.

    Records that an earlier stage already decided pass through unchanged. `content` is the
    file's bytes when they were fetched (from a PACS) rather than read from ``abs_path``.
    """
    if not record.pending:
        return record
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on every odd value; cron mails output
        try:
            ds = read_dataset_header(record.abs_path if content is None else content)
        except InvalidDicomError:
            return record.skip("not_dicom")
        except HeaderError as exc:
            return record.fail(exc.reason, exc.detail)
        except OSError as exc:
            return record.fail(*os_failure(exc))
        except Exception as exc:  # pydicom raises many types for broken headers
            return record.fail(f"header_error:{type(exc).__name__}", str(exc))
        try:
            return classify(record, ds, options)
        except Exception as exc:  # a value that only breaks when used
            return record.fail(f"header_error:{type(exc).__name__}", str(exc))


def read_headers(batch: list[ImageRecord], options: StageOptions) -> list[ImageRecord]:
    """The header stage over a batch of records (the shape a batch engine calls)."""
    return [read_header(record, options) for record in batch]
