"""An SR at a fraction of highdicom's cost: what no study changes is built and encoded once
per model and run, and each study's SR is its own values encoded and put in between.

Why: built with highdicom's full constructor (:func:`batchscan.pacs.sr.build_sr`), an SR
costs some 60 ms of CPU, more than scoring its study: highdicom builds and checks the
whole content tree, copies it, walks it to collect the evidence, reads its tables of the
standard several times, and pydicom then encodes some 400 elements one by one. Nearly all
of it is the same in every SR of a run: the observer, the algorithm, the codes, the heading
of every content item.

How: a DICOM data set is the concatenation of its elements in tag order, and a sequence
item or a sequence of explicit length is its content's bytes behind a tag and a length
(PS3.5 7.1, 7.5). :class:`SrTemplate` builds the SR of a probe study of one image with
:func:`~batchscan.pacs.sr.build_sr` (highdicom, once per model and run), keeps the encoded
bytes of every part that no study changes, and splits each content item that holds a
study's value around the value. A study's SR is then its values, each encoded by pydicom
exactly as in the full constructor's SR (UIDs, texts, numbers, the patient and study
attributes of the source header), joined with those bytes: the same data set, element for
element, as :func:`~batchscan.pacs.sr.build_sr` makes (``tests/test_sr.py`` holds them
equal for the demo studies and for headers of real devices).

What stays with highdicom: the image library entries of describable images, per study; the
source's acquisition equipment item and the SR's character set, once per device and per
character set; its checks on the source's SOP class (it looks the class up in its tables of
the standard on every call, milliseconds each), once per SOP class.
"""

from __future__ import annotations

import datetime as dt
import functools
import struct
from collections.abc import Iterable, Sequence
from typing import Any, Final

import highdicom as hd
from pydicom.charset import default_encoding
from pydicom.datadict import keyword_dict
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import DA, DS, DT, TM

from batchscan.ingest.records import INTERPRETER_EXITS
from batchscan.pacs.sr import (
    COPIED,
    DISTANCE_DIGITS,
    IN_DOMAIN,
    OUT_OF_DISTRIBUTION,
    SCORE_DIGITS,
    Algorithm,
    ScoredImage,
    StudyResult,
    Verdicts,
    build_sr,
    describable,
    image_tracking,
    image_verdicts,
    report_evaluations,
    separate,
    sr_series_uid,
    study_tracking,
    study_verdicts,
    verdict_item,
)

_PREAMBLE: Final = b"\0" * 128 + b"DICM"
_ITEM: Final = b"\xfe\xff\x00\xe0"
_CONTENT: Final = Tag("ContentSequence")
_MEASURED_VALUE: Final = Tag("MeasuredValueSequence")
_FLOAT_VALUE: Final = Tag("FloatingPointValue")
_NUMERIC_VALUE: Final = Tag("NumericValue")
_TEXT_VALUE: Final = Tag("TextValue")
_UID: Final = Tag("UID")
_REFERENCED_SOP: Final = Tag("ReferencedSOPSequence")
_EQUIPMENT: Final = Tag("ContributingEquipmentSequence")
_EVIDENCE: Final = Tag("CurrentRequestedProcedureEvidenceSequence")
_CONTRIBUTED: Final = Tag("ContributionDateTime")
_MEDIA_INSTANCE: Final = Tag("MediaStorageSOPInstanceUID")
_CHARSET: Final = Tag("SpecificCharacterSet")
_CREATION_DATE: Final = Tag("InstanceCreationDate")
_CREATION_TIME: Final = Tag("InstanceCreationTime")
_SOP_INSTANCE: Final = Tag("SOPInstanceUID")
_SERIES: Final = Tag("SeriesInstanceUID")
_STUDY: Final = Tag("StudyInstanceUID")
_INSTANCE_NUMBER: Final = Tag("InstanceNumber")
_REFERENCED_SERIES: Final = Tag("ReferencedSeriesSequence")
_REFERENCED_CLASS: Final = Tag("ReferencedSOPClassUID")
_REFERENCED_INSTANCE: Final = Tag("ReferencedSOPInstanceUID")
#: Top-level attributes whose values are a study's own (besides its copied patient and
#: study attributes); every other attribute of the probe's SR is the run's.
_PER_STUDY: Final = frozenset(
    {
        _CREATION_DATE,
        _CREATION_TIME,
        _SOP_INSTANCE,
        _SERIES,
        _INSTANCE_NUMBER,
        _EQUIPMENT,
        _EVIDENCE,
        _CONTENT,
    }
)
#: The probe's source: a CR image without Patient Orientation (so no image library entry)
#: and without Manufacturer (so no acquisition equipment item).
_PROBE_CLASS: Final = "1.2.840.10008.5.1.4.1.1.1"


# -- encoding, as pydicom does it --------------------------------------------------------


def _buffer() -> DicomBytesIO:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    return buffer


Encodings = str | list[str] | None


def _encode(dataset: Dataset, encodings: Encodings = None) -> bytes:
    """The elements of `dataset` as pydicom writes them in an SR of the Specific Character
    Set `encodings` (None: the default repertoire), in Explicit VR Little Endian."""
    buffer = _buffer()
    write_dataset(buffer, dataset, parent_encoding=encodings or default_encoding)
    return buffer.getvalue()


#: VRs whose length field is 4 bytes after 2 reserved ones (PS3.5 7.1.2); of those this
#: module writes itself, UT.
_LONG: Final = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """An element of an encoded value: tag, VR, length and the value padded to even length
    (UI with NUL, text with a space), as pydicom writes it in Explicit VR Little Endian."""
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    if vr in _LONG:
        header = struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value))
    else:
        header = struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value))
    return header + value


def _uid(tag: int, uid: str) -> bytes:
    return _element(tag, "UI", uid.encode("ascii"))


def _string(tag: int, vr: str, value: object, encodings: Encodings = None) -> bytes:
    """A text or number-string element (UT, IS, DS, DA, TM): its ASCII text, the same
    bytes in every character set an SR may declare (a text that is not ASCII, as pydicom
    encodes it in the SR's)."""
    text = str(value)
    if not text.isascii():
        return _copy(DataElement(tag, vr, value), encodings)
    return _element(tag, vr, text.encode("ascii"))


def _double(tag: int, value: float) -> bytes:
    return _element(tag, "FD", struct.pack("<d", value))


def _copy(element: DataElement, encodings: Encodings) -> bytes:
    """An element of a source header, as pydicom writes it in the SR."""
    buffer = _buffer()
    write_data_element(buffer, element, encodings or default_encoding)
    return buffer.getvalue()


def _item(body: bytes) -> bytes:
    """A sequence item of explicit length, as pydicom writes one."""
    return _ITEM + struct.pack("<I", len(body)) + body


def _sequence(tag: int, items: Iterable[bytes]) -> bytes:
    """A sequence element of explicit length holding encoded items."""
    value = b"".join(items)
    header = struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"SQ", 0, len(value))
    return header + value


def _before(item: Dataset, tag: BaseTag, encodings: Encodings = None) -> bytes:
    """An item's elements before `tag`: the heading of the value a study gives it."""
    return _encode(Dataset({e.tag: e for e in item if e.tag < tag}), encodings)


def _after(item: Dataset, tag: BaseTag, encodings: Encodings = None) -> bytes:
    """An item's elements after `tag`."""
    return _encode(Dataset({e.tag: e for e in item if e.tag > tag}), encodings)


def _whole(items: Iterable[Dataset]) -> bytes:
    return b"".join(_item(_encode(item)) for item in items)


# -- highdicom's per-SOP-class answers, asked once ---------------------------------------


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def _find(items: Sequence[Dataset], code_value: str) -> Dataset:
    for item in items:
        if item.ConceptNameCodeSequence[0].CodeValue == code_value:
            return item
    raise LookupError(f"the probe SR has no content item named {code_value}")


@functools.cache
def _is_image(sop_class_uid: str) -> bool:
    """Whether highdicom takes this SOP class for an image (asked once per class)."""
    probe = Dataset()
    probe.SOPClassUID = sop_class_uid
    probe.Manufacturer = "probe"
    try:
        hd.ContributingEquipment.for_image_acquisition(probe)
    except ValueError:
        return False
    return True


#: What highdicom's acquisition equipment item copies from the source header.
_EQUIPMENT_KEYWORDS: Final = (
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InstitutionAddress",
    "StationName",
)


def acquisition_equipment(header: Dataset, encodings: Encodings = None) -> bytes:
    """The encoded Contributing Equipment item that highdicom's SR has for the first
    source's acquisition equipment (``ContributingEquipment.for_image_acquisition``), or
    nothing when it has none (no manufacturer, or no image). The item is made by highdicom
    once per device (its checks included) and its time, the source's acquisition time,
    put in per study."""
    values = tuple(header.get(keyword) for keyword in _EQUIPMENT_KEYWORDS)
    if values[0] is None or values[0] == "" or not _is_image(str(header.SOPClassUID)):
        return b""
    when = header.get("AcquisitionDateTime")
    if when is None:
        date, time = header.get("AcquisitionDate"), header.get("AcquisitionTime")
        if isinstance(date, dt.date) and isinstance(time, dt.time):
            when = dt.datetime.combine(date, time)
    key = tuple((v, type(v)) for v in map(_hashable, values))
    before, after = _equipment(key, _hashable(encodings))
    moment = b"" if when is None else _string(_CONTRIBUTED, "DT", DT(when), encodings)
    return _item(before + moment + after)


def _hashable(value: Any) -> Any:
    """A header value as a key: a multi-valued one as a tuple."""
    return value if isinstance(value, str) or not isinstance(value, Sequence) else tuple(value)


@functools.lru_cache(maxsize=256)
def _equipment(values: tuple[tuple[Any, type], ...], encodings: Any) -> tuple[bytes, bytes]:
    """highdicom's acquisition equipment item of a device, encoded around its time."""
    given = dict(zip(_EQUIPMENT_KEYWORDS, (v for v, _ in values), strict=True))
    item = hd.ContributingEquipment(
        manufacturer=given["Manufacturer"],
        purpose_of_reference=codes.DCM.AcquisitionEquipment,
        manufacturer_model_name=given["ManufacturerModelName"],
        software_versions=_listed(given["SoftwareVersions"]),
        device_serial_number=given["DeviceSerialNumber"],
        institution_name=given["InstitutionName"],
        institutional_department_name=given["InstitutionalDepartmentName"],
        institution_address=given["InstitutionAddress"],
        station_name=given["StationName"],
        contribution_description="Acquisition equipment of the source image(s)",
    )
    charset = _listed(encodings)
    return _before(item, _CONTRIBUTED, charset), _after(item, _CONTRIBUTED, charset)


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


#: What highdicom's image library entry (TID 1602 to 1604) reads from a header, by the
#: header's Modality: an image that lacks one of these, or has it empty, makes highdicom's
#: entry fail, and so has no entry (:func:`batchscan.pacs.sr.describable`).
_DESCRIBED: Final = ("Rows", "Columns")
_PROJECTION: Final = ("PatientOrientation", "ImagerPixelSpacing")
_CROSS_SECTIONAL: Final = (
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
)
_NEEDS: Final = {
    **dict.fromkeys(("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"), _DESCRIBED + _PROJECTION),
    **dict.fromkeys(("CT", "MR", "PT"), _DESCRIBED + _CROSS_SECTIONAL),
}


@functools.cache
def _library_class(sop_class_uid: str) -> bool:
    """Whether highdicom describes images of this SOP class at all (asked once per class,
    with a header of nothing but what every entry needs)."""
    probe = Dataset()
    probe.SOPClassUID = sop_class_uid
    probe.SOPInstanceUID = "1.2.3"
    probe.Rows = probe.Columns = 1
    probe.Modality = "OT"
    return describable(probe)


def in_library(header: Dataset) -> bool:
    """:func:`batchscan.pacs.sr.describable`, answered without highdicom (milliseconds a
    call) for the images it cannot describe for want of an attribute or of its class."""
    if not _library_class(str(header.SOPClassUID)):
        return False
    needs = _NEEDS.get(str(header.get("Modality", "")), _DESCRIBED)
    if any(header.get(keyword) in (None, "", []) for keyword in needs):
        return False
    return describable(header)


class _Bare(hd.SOPClass):
    """A highdicom SOP instance with nothing in it, for highdicom's own copy of a
    source's patient and study modules."""

    def __init__(self) -> None:
        Dataset.__init__(self)


@functools.cache
def _copied(sop_class_uid: str) -> tuple[BaseTag, ...]:
    """The attributes highdicom copies from a source of this SOP class into the SR: the
    ones the SR document sets from the first source, and every root attribute of the
    Patient and Study modules of the source's IOD (found by letting highdicom copy from a
    header that holds every attribute of the dictionary)."""
    everything = Dataset(
        {Tag(tag): DataElement(tag, "UN", None) for tag in keyword_dict.values() if tag >> 16 > 2}
    )
    everything.SOPClassUID = sop_class_uid
    bare = _Bare()
    bare.copy_patient_and_study_information(everything)
    tags = {element.tag for element in bare} | {Tag(keyword) for keyword in COPIED}
    return tuple(sorted(tags | {Tag("StudyInstanceUID")}))


# -- the template ------------------------------------------------------------------------


class SrTemplate:
    """Everything the SRs of one model and run say that no study changes, encoded once;
    :meth:`encode` makes a study's SR with it.

    Parameters
    ----------
    algorithm:
        The model and its threshold.
    analysed_at:
        The time of analysis: the SRs' Content Date and Time.
    """

    def __init__(self, algorithm: Algorithm, analysed_at: dt.datetime) -> None:
        self.algorithm, self.analysed_at = algorithm, analysed_at
        self.charsets: dict[Any, tuple[bytes, Encodings] | None] = {}
        study, evidence = _probe()
        probe = build_sr(study, evidence, algorithm, "2.25.1", 1, analysed_at)
        meta = FileMetaDataset(probe.file_meta)
        write_file_meta_info(_buffer(), meta)  # completes it, as when an SR is written
        del meta.FileMetaInformationGroupLength
        self.meta = (_before(meta, _MEDIA_INSTANCE), _after(meta, _MEDIA_INSTANCE))
        copied = set(_copied(_PROBE_CLASS))
        self.fixed = {
            e.tag: _encode(Dataset({e.tag: e}))
            for e in probe
            if e.tag not in _PER_STUDY and e.tag not in copied
        }
        # batchscan's item and highdicom's (the probe's source names no equipment)
        self.equipment = _whole(probe.ContributingEquipmentSequence)
        root = _children(probe)
        measurements = _find(root, "126010")
        self.head = _whole(root[: root.index(measurements)])
        self.measurements = _before(measurements, _CONTENT)
        self.evaluations = {
            flag: _item(_encode(separate(report_evaluations(flag)))) for flag in (True, False)
        }
        study_group, image_group = _children(measurements)
        self.group = _before(study_group, _CONTENT)
        items = _children(study_group)
        self.tracking_text = _before(items[0], _TEXT_VALUE)
        self.tracking_uid = _before(items[1], _UID)
        score = _find(items, "BSC001")
        self.common = _whole(items[2 : items.index(score)])  # finding, algorithm
        self.score = _before(score, _MEASURED_VALUE)
        self.units = _before(score.MeasuredValueSequence[0], _FLOAT_VALUE)
        self.threshold = _whole(items[-1:])
        image_items = _children(image_group)
        self.inferred_from = _after(_children(_find(image_items, "BSC001"))[-1], _REFERENCED_SOP)
        self.source = _after(image_items[-1], _REFERENCED_SOP)
        self.distance = _before(_find(image_items, "BSC006"), _MEASURED_VALUE)
        self.verdicts = {
            (concept.value, value): _item(_encode(verdict_item(concept, value)))
            for concept in (IN_DOMAIN, OUT_OF_DISTRIBUTION)
            for value in (True, False, None)
        }

    def encode(
        self,
        study: StudyResult,
        evidence: Sequence[Dataset],
        sop_instance_uid: str,
        instance_number: int,
    ) -> bytes:
        """A study's SR as the bytes of a DICOM file: the data set that
        :func:`~batchscan.pacs.sr.build_sr` makes of the same arguments.

        Raises
        ------
        Exception
            What pydicom or highdicom raise for a header value that no SR can carry, as
            :func:`~batchscan.pacs.sr.build_sr` would.
        """
        first = evidence[0]
        elements = dict(self.fixed)
        encodings = first.get("SpecificCharacterSet")
        if encodings is not None:  # highdicom's SR declares the first source's
            elements[_CHARSET], encodings = self._character_set(_hashable(encodings))
        for tag in _copied(str(first.SOPClassUID)):
            if tag in first:
                elements[tag] = _copy(first[tag], encodings)
        now = dt.datetime.now()
        elements[_CREATION_DATE] = _string(_CREATION_DATE, "DA", DA(now.date()))
        elements[_CREATION_TIME] = _string(_CREATION_TIME, "TM", TM(now.time()))
        elements[_SOP_INSTANCE] = _uid(_SOP_INSTANCE, sop_instance_uid)
        elements[_SERIES] = _uid(_SERIES, sr_series_uid(study.study_instance_uid))
        elements[_INSTANCE_NUMBER] = _string(_INSTANCE_NUMBER, "IS", int(instance_number))
        acquisition = acquisition_equipment(first, encodings)
        elements[_EQUIPMENT] = _sequence(_EQUIPMENT, [acquisition, self.equipment])
        sources = _unique(evidence)
        references = {h.SOPInstanceUID: _reference(h) for h in sources}
        elements[_EVIDENCE] = _evidence(study, sources, references)
        elements[_CONTENT] = self._content(study, evidence, references, encodings)
        meta = self.meta[0] + _uid(_MEDIA_INSTANCE, sop_instance_uid) + self.meta[1]
        group_length = struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(meta))
        data = b"".join(elements[tag] for tag in sorted(elements))
        return _PREAMBLE + group_length + meta + data

    def _character_set(self, value: Any) -> tuple[bytes, Encodings]:
        """The SR's Specific Character Set element for a source's, and the value pydicom
        encodes the SR's texts with: highdicom checks it (once per value, with the probe).

        Raises
        ------
        ValueError
            highdicom refuses the source's character set.
        """
        if value not in self.charsets:
            study, evidence = _probe()
            evidence[0].SpecificCharacterSet = _listed(value)
            try:
                probe = build_sr(study, evidence, self.algorithm, "2.25.1", 1, self.analysed_at)
            except INTERPRETER_EXITS:
                raise
            except Exception:
                self.charsets[value] = None
            else:
                element = probe["SpecificCharacterSet"]
                encoded = _encode(Dataset({element.tag: element}))
                self.charsets[value] = (encoded, _listed(_hashable(element.value)))
        known = self.charsets[value]
        if known is None:
            raise ValueError("a character set highdicom refuses")
        return known

    def _content(
        self,
        study: StudyResult,
        evidence: Sequence[Dataset],
        references: dict[str, bytes],
        encodings: Encodings,
    ) -> bytes:
        """The root's ContentSequence: the fixed head (language, observer, procedure), the
        image library, the measurement groups and the report's evaluations."""
        described = [header for header in evidence if in_library(header)]
        library = hd.sr.ImageLibrary(described) if described else []
        entries = b"".join(_item(_encode(separate(item), encodings)) for item in library)
        score = self._score(study.score, study_verdicts(study))
        groups = [self._group(*study_tracking(study), score, self.threshold)]
        for image in study.images:
            reference = _sequence(_REFERENCED_SOP, [_item(references[image.sop_instance_uid])])
            inferred_from = reference + self.inferred_from
            items = [self._score(image.score, image_verdicts(image), inferred_from)]
            if image.ood_score is not None:
                items.append(
                    _item(self.distance + self._measured(image.ood_score, DISTANCE_DIGITS))
                )
            items.append(_item(reference + self.source))
            identifier, uid = image_tracking(image)
            groups.append(self._group(identifier, uid, *items, encodings=encodings))
        measurements = _item(self.measurements + _sequence(_CONTENT, groups))
        return _sequence(_CONTENT, [self.head, entries, measurements, self.evaluations[study.flag]])

    def _group(
        self, identifier: str, uid: str, *items: bytes, encodings: Encodings = None
    ) -> bytes:
        """A measurement group (TID 1501): tracking identifier and UID, finding, algorithm,
        then its measurements."""
        tracking = _item(self.tracking_text + _string(_TEXT_VALUE, "UT", identifier, encodings))
        tracking += _item(self.tracking_uid + _uid(_UID, uid))
        return _item(self.group + _sequence(_CONTENT, [tracking, self.common, *items]))

    def _score(self, value: float, verdicts: Verdicts, *image: bytes) -> bytes:
        """A score NUM qualified by its verdicts (and referencing its image)."""
        children = [self.verdicts[concept.value, verdict] for concept, verdict in verdicts]
        children += [_item(reference) for reference in image]
        return _item(
            self.score + self._measured(value, SCORE_DIGITS) + _sequence(_CONTENT, children)
        )

    def _measured(self, value: float, digits: int) -> bytes:
        """A NUM's Measured Value Sequence: the value as FD and DS, as highdicom sets it."""
        value = round(value, digits)
        number = self.units + _double(_FLOAT_VALUE, value)
        number += _string(_NUMERIC_VALUE, "DS", DS(value, auto_format=True))
        return _sequence(_MEASURED_VALUE, [_item(number)])


def _unique(evidence: Sequence[Dataset]) -> list[Dataset]:
    """The sources, each SOP instance once (as highdicom collects them)."""
    seen: dict[str, Dataset] = {}
    for header in evidence:
        seen.setdefault(header.SOPInstanceUID, header)
    return list(seen.values())


def _reference(header: Dataset) -> bytes:
    """The body of a Referenced SOP Sequence item naming a source."""
    return _uid(_REFERENCED_CLASS, header.SOPClassUID) + _uid(
        _REFERENCED_INSTANCE, header.SOPInstanceUID
    )


def _evidence(
    study: StudyResult, sources: Sequence[Dataset], references: dict[str, bytes]
) -> bytes:
    """CurrentRequestedProcedureEvidenceSequence: the sources grouped by series, in their
    order (as highdicom groups them)."""
    series: dict[str, list[bytes]] = {}
    for header in sources:
        series.setdefault(header.SeriesInstanceUID, []).append(
            _item(references[header.SOPInstanceUID])
        )
    series_items = [
        _item(_sequence(_REFERENCED_SOP, sops) + _uid(_SERIES, uid)) for uid, sops in series.items()
    ]
    study_item = _sequence(_REFERENCED_SERIES, series_items)
    study_item += _uid(_STUDY, study.study_instance_uid)
    return _sequence(_EVIDENCE, [_item(study_item)])


def _probe() -> tuple[StudyResult, list[Dataset]]:
    """A study of one image with every optional content item (an OOD distance)."""
    header = Dataset()
    header.SOPClassUID = _PROBE_CLASS
    header.SOPInstanceUID = "1.2.3.4.5"
    header.StudyInstanceUID = "1.2.3.4"
    header.SeriesInstanceUID = "1.2.3.4.6"
    header.Modality = "CR"
    for keyword in COPIED:
        setattr(header, keyword, "")
    image = ScoredImage("probe.dcm", 1, 1, "1.2.3.4.5", _PROBE_CLASS, "1.2.3.4.6", "PA", 0.5,
                        1.0, False, True)  # fmt: skip
    return StudyResult("1.2.3.4", 0.5, True, "frontal", True, (image,)), [header]
