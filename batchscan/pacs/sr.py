"""One DICOM Structured Report per scored study (``batchscan scan --sr-out DIR``).

Why TID 1500 (Measurement Report) in a Comprehensive SR: it is the template that viewers
show for AI results (OHIF reads it) and that IHE AI Results (AIR) names for measurements
and qualitative findings; highdicom builds and checks it, and it holds what a radiologist
needs beside the images, as coded, machine-readable content:

* the study group (TID 1501, tracking identifier "batchscan study score"): the algorithm
  (TID 4019: name, ``model_version``, the threshold as a parameter), the finding type
  Pneumonia, the study's score and the operating threshold as NUM items (TID 300), the
  score qualified (TID 300 row 2, HAS CONCEPT MOD) by the training-domain and OOD verdicts
  as coded Yes / No / Undetermined;
* one group per scored image: its score (a NUM that references the image, qualified by the
  image's OOD and training-domain verdicts) and its OOD distance, with the image as the
  group's source;
* the report's Qualitative Evaluations (TID 1500 rows 12 to 14): "Flagged for review"
  Yes / No and the text saying plainly that this is no diagnosis;
* the scored images in the image library and in CurrentRequestedProcedureEvidenceSequence.

AIR's identification of the algorithm (Rev. 1.1, section 6.5.3.1): an item of the
Contributing Equipment Sequence with Purpose of Reference (Newcode1, 99IHE, "Processing
Algorithm"), Manufacturer, Manufacturer's Model Name (= the TID 4019 algorithm name),
Software Versions (= the model version) and a Device UID derived from the model version,
the same UID as the TID 1004 device observer's, so that it changes when the model does.
Content Date and Time are the time of analysis (the start of the scan run).

The patient and study modules are copied from the scored images' own headers (read at SR
time, pixels never: the state holds no identity), so the PACS files the SR into the
original study; the SR has a series of its own (one per study, "batchscan").

UIDs are derived, not drawn (:func:`derived_uid`): the SOP Instance UID is a ``2.25`` UID
of a digest of the study, the model and the scored content (each image's UID, score, OOD
and domain verdicts), so a rerun with nothing new derives the same UID and writes nothing,
and a new image or a new model derives a new UID and a new SR, the earlier one kept.

Codes: SNOMED CT and DICOM where they exist (Pneumonia 233604007, the procedure reported
"Imaging procedure" 363679005 from CID 100 with "Plain chest X-ray" 399208008 as the
performed procedure, Yes/No/Undetermined, "Comment"); the score, flag, threshold and
verdict names are batchscan's own private scheme ``99BSCAN`` (declared in the SR's Coding
Scheme Identification Sequence, as is AIR's ``99IHE``), because no standard code names a
pneumonia probability.

:func:`build_sr` builds the SR with highdicom's full constructor, the reference;
:mod:`batchscan.pacs.template` makes the same SR at a fraction of the cost, for the scan.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Final

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM

from batchscan import __version__
from batchscan.ingest.paths import from_state, open_binary, stat
from batchscan.ingest.records import INTERPRETER_EXITS

# highdicom logs a patient name it finds odd, quoting it ("value of argument patient_name is
# potentially invalid: ..."): no patient value may reach batchscan's log, which cron mails
logging.getLogger("highdicom").setLevel(logging.CRITICAL + 1)

#: Version of what an SR says: part of the UID digest, so that a release that changes the
#: content makes new SRs (and one that does not, none).
SR_FORMAT: Final = 2
SERIES_NUMBER: Final = 9901
SERIES_DESCRIPTION: Final = "batchscan pneumonia score (AI, not a diagnosis)"
DISCLAIMER: Final = (
    "Not a diagnosis. batchscan is a research and triage aid, not a medical device: a "
    "pneumonia CNN's score of the chest radiographs named here, to be read by a radiologist."
)
MANUFACTURER: Final = "batchscan"
#: Digits the SR keeps of a score (and the threshold) and of an OOD distance.
SCORE_DIGITS: Final = 6
DISTANCE_DIGITS: Final = 4
ALGORITHM_NAME: Final = "batchscan pneumonia CNN"

SCHEME: Final = "99BSCAN"
PNEUMONIA_SCORE: Final = hd.sr.CodedConcept("BSC001", SCHEME, "Pneumonia score")
FLAGGED: Final = hd.sr.CodedConcept("BSC002", SCHEME, "Flagged for review")
THRESHOLD: Final = hd.sr.CodedConcept("BSC003", SCHEME, "Operating threshold")
IN_DOMAIN: Final = hd.sr.CodedConcept("BSC004", SCHEME, "In the model's training domain")
OUT_OF_DISTRIBUTION: Final = hd.sr.CodedConcept("BSC005", SCHEME, "Out of distribution")
OOD_DISTANCE: Final = hd.sr.CodedConcept("BSC006", SCHEME, "Out-of-distribution distance")
PNEUMONIA: Final = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
#: TID 1500's procedure reported, from CID 100 (which holds no code for a chest
#: radiograph); the SR document's performed procedure says which imaging it was.
IMAGING_PROCEDURE: Final = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
CHEST_XRAY: Final = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
#: TID 1500 row 12: the container of the report's qualitative evaluations.
QUALITATIVE_EVALUATIONS: Final = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT: Final = hd.sr.CodedConcept("121106", "DCM", "Comment")
#: IHE AIR's Purpose of Reference of the algorithm's Contributing Equipment item.
PROCESSING_ALGORITHM: Final = hd.sr.CodedConcept("Newcode1", "99IHE", "Processing Algorithm")
#: The private coding schemes the SR uses: designator, name, responsible organization.
PRIVATE_SCHEMES: Final = (
    (SCHEME, "batchscan result codes", "batchscan"),
    ("99IHE", "IHE private codes", "IHE International"),
)

#: Patient and study attributes highdicom copies from the first source; type 2 in the SR,
#: so a source without one gets it empty (on the in-memory copy only).
COPIED: Final = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


class EvidenceError(RuntimeError):
    """A source file cannot serve as the SR's evidence; ``reason`` is a short code
    (``source_changed``, ``source_unreadable``, ``source_mismatch``) that names no value
    of the header, so it may be logged."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ScoredImage:
    """One scored image of a study, as the state has it."""

    path: str
    size: int
    mtime_ns: int
    sop_instance_uid: str
    sop_class_uid: str | None
    series_instance_uid: str | None
    view: str | None
    score: float
    ood_score: float | None
    ood: bool | None
    in_domain: bool | None


@dataclass(frozen=True, slots=True)
class StudyResult:
    """A scored study: its row of ``studies.parquet`` and its scored images."""

    study_instance_uid: str
    score: float
    flag: bool
    score_basis: str
    in_domain: bool | None
    images: tuple[ScoredImage, ...]


@dataclass(frozen=True, slots=True)
class Algorithm:
    """What made the scores: the model and its operating threshold."""

    model_version: str
    threshold: float
    code_version: str = __version__


def study_results(rows: Iterator[tuple[Any, ...]]) -> Iterator[StudyResult]:
    """Group the rows of
    :meth:`~batchscan.results.state.StateStore.scored_study_images` (ordered by study)
    into studies."""
    current: list[tuple[Any, ...]] = []
    for row in rows:
        if current and row[0] != current[0][0]:
            yield _study(current)
            current = []
        current.append(row)
    if current:
        yield _study(current)


def _bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _study(rows: list[tuple[Any, ...]]) -> StudyResult:
    first = rows[0]
    return StudyResult(
        study_instance_uid=first[0],
        score=float(first[1]),
        flag=bool(first[2]),
        score_basis=first[3],
        in_domain=_bool(first[4]),
        images=tuple(
            ScoredImage(
                path=from_state(r[5]),
                size=int(r[6]),
                mtime_ns=int(r[7]),
                sop_instance_uid=r[8],
                sop_class_uid=r[9],
                series_instance_uid=r[10],
                view=r[11],
                score=float(r[12]),
                ood_score=None if r[13] is None else float(r[13]),
                ood=_bool(r[14]),
                in_domain=_bool(r[15]),
            )
            for r in rows
        ),
    )


def content_digest(study: StudyResult, algorithm: Algorithm) -> str:
    """SHA-256 of everything the SR says that comes from the scan (scores to 1e-6): equal
    digests, equal SRs."""
    content = {
        "format": SR_FORMAT,
        "study": study.study_instance_uid,
        "model": algorithm.model_version,
        "threshold": round(algorithm.threshold, SCORE_DIGITS),
        "score": round(study.score, SCORE_DIGITS),
        "flag": study.flag,
        "basis": study.score_basis,
        "in_domain": study.in_domain,
        "images": [
            [
                i.sop_instance_uid,
                round(i.score, SCORE_DIGITS),
                i.ood,
                None if i.ood_score is None else round(i.ood_score, DISTANCE_DIGITS),
                i.in_domain,
                i.view,
            ]
            for i in study.images
        ],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


#: Namespace of batchscan's name-based UUIDs (a fixed random UUID: never change it, or
#: every SR's UID changes).
UID_NAMESPACE: Final = uuid.UUID("6f1c2a4e-9b3d-4e57-8a61-0c7d2b9e5f13")


def derived_uid(kind: str, name: str) -> str:
    """A ``2.25`` UID (PS3.5 B.2) of a name-based UUID (RFC 9562 version 5) of `kind` and
    `name`: the same inputs give the same UID on every machine, and nothing else does.

    (pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources and draws a random
    UUID, which would make every rerun write new SRs.)
    """
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, f'batchscan {kind}: {name}').int}"


def sr_instance_uid(digest: str) -> str:
    """The SR's SOP Instance UID: a ``2.25`` UID of the content digest."""
    return derived_uid("sr", digest)


def sr_series_uid(study_instance_uid: str) -> str:
    """The Series Instance UID of batchscan's SRs in a study (the same for every SR of it,
    so that a viewer shows them as one series)."""
    return derived_uid("sr series", study_instance_uid)


#: What fetches a PACS's instance by its path (``STUDY/SERIES/SOP``) for a PACS scan's SRs
#: (:class:`batchscan.engines.fetch.InstanceReader`): the bytes, or an exception.
Fetch = Callable[[str], bytes]


def read_evidence(archive: Path | Fetch, study: StudyResult) -> list[Dataset]:
    """The headers (no pixel data) of a study's scored images, checked against the state:
    read from the archive folder, or fetched again from the PACS a scan read (`archive` a
    :data:`Fetch`; an instance is the one scored when its size is the one stored).

    Raises
    ------
    EvidenceError
        A file changed since it was scored (``source_changed``: the next scan scores it
        again and then writes the SR), cannot be read as DICOM or fetched
        (``source_unreadable``), or is not the image the state names (``source_mismatch``).
    """
    evidence = []
    for image in study.images:
        source = _source(archive, image)
        try:
            with source:
                header = pydicom.dcmread(source, stop_before_pixels=True)
        except INTERPRETER_EXITS:
            raise
        except BaseException:
            raise EvidenceError("source_unreadable") from None
        if (
            header.get("SOPInstanceUID") != image.sop_instance_uid
            or header.get("StudyInstanceUID") != study.study_instance_uid
            or "SOPClassUID" not in header
            or "SeriesInstanceUID" not in header
        ):
            raise EvidenceError("source_mismatch")
        fit_for_sr(header)
        evidence.append(header)
    return evidence


def _source(archive: Path | Fetch, image: ScoredImage) -> BinaryIO:
    """The scored image's file (or fetched bytes) to read its header from.

    Raises
    ------
    EvidenceError
        It changed or went since it was scored, or cannot be fetched.
    """
    if callable(archive):
        try:
            data = archive(image.path)
        except INTERPRETER_EXITS:
            raise
        except BaseException as exc:  # a fetch error, the PACS gone: tried again next run
            gone = getattr(exc, "reason", None) == "fetch_error:not_found"
            raise EvidenceError("source_changed" if gone else "source_unreadable") from None
        if len(data) != image.size:
            raise EvidenceError("source_changed")
        return io.BytesIO(data)
    path = os.path.join(os.fspath(archive), image.path)
    try:
        now = stat(path)
    except OSError:
        raise EvidenceError("source_changed") from None
    if (now.st_size, now.st_mtime_ns) != (image.size, image.mtime_ns):
        raise EvidenceError("source_changed")
    try:
        return open_binary(path)
    except OSError:
        raise EvidenceError("source_unreadable") from None


def _parses(kind: type, value: Any) -> bool:
    try:
        kind(value)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def fit_for_sr(header: Dataset) -> None:
    """Make a source header's patient and study attributes fit to copy into an SR, in
    place (on the in-memory copy only; the archive is never written).

    They are type 2 in the SR: a missing one is added empty, and so is a date, time or sex
    that is no valid DA, TM or CS value (a study date of 20260231, a time of "25:00", a sex
    of "male"): real archives hold such values, and the PACS files the SR by its Study
    Instance UID, not by them. Copying them would make an invalid SR (or none at all).
    """
    for keyword in COPIED:
        if keyword not in header or header[keyword].value is None:
            setattr(header, keyword, "")
    for keyword, kind in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        value = header[keyword].value
        if value != "" and not _parses(kind, str(value)):
            setattr(header, keyword, "")
    if header.PatientSex not in ("", "M", "F", "O"):
        header.PatientSex = ""


def device_uid(algorithm: Algorithm) -> str:
    """The Device UID of the algorithm (AIR: it changes when the model changes): a ``2.25``
    UID of the model version, which names the weights' digest, so the same model has the same
    UID on every machine and in every batchscan release."""
    return derived_uid("device", algorithm.model_version)


def algorithm_equipment(algorithm: Algorithm) -> Dataset:
    """The algorithm's item of the Contributing Equipment Sequence, as IHE AIR specifies it
    (Rev. 1.1, 6.5.3.1): purpose "Processing Algorithm", manufacturer, model name, software
    versions and Device UID, with the values AIR's Table 6.5.3.1-1 pairs with the content
    tree's TID 4019 algorithm name and version and TID 1004 device observer UID."""
    item = Dataset()
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = ALGORITHM_NAME
    item.DeviceUID = device_uid(algorithm)
    item.SoftwareVersions = algorithm.model_version
    item.PurposeOfReferenceCodeSequence = [_code_item(PROCESSING_ALGORITHM)]
    return item


def coding_schemes() -> list[Dataset]:
    """The Coding Scheme Identification Sequence's items: the private schemes used."""
    items = []
    for designator, name, organization in PRIVATE_SCHEMES:
        scheme = Dataset()
        scheme.CodingSchemeDesignator = designator
        scheme.CodingSchemeName = name
        scheme.CodingSchemeResponsibleOrganization = organization
        items.append(scheme)
    return items


def _code_item(code: hd.sr.CodedConcept) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def yes_no(value: bool | None) -> hd.sr.CodedConcept:
    """SNOMED CT's Yes, No, or Undetermined for an unknown verdict."""
    code = codes.SCT.Undetermined if value is None else codes.SCT.Yes if value else codes.SCT.No
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def study_ood(study: StudyResult) -> bool | None:
    """The study's OOD verdict: out of distribution when any scored image is, unknown when
    any image's verdict is."""
    verdicts = [i.ood for i in study.images]
    return None if None in verdicts else any(verdicts)


def verdict_item(concept: hd.sr.CodedConcept, value: bool | None) -> hd.sr.CodeContentItem:
    """A verdict qualifying a score: HAS CONCEPT MOD CODE, Yes / No / Undetermined."""
    return hd.sr.CodeContentItem(
        name=concept,
        value=yes_no(value),
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
    )


Verdicts = list[tuple[hd.sr.CodedConcept, bool | None]]


def study_verdicts(study: StudyResult) -> Verdicts:
    """What qualifies the study's score: its training-domain and OOD verdicts."""
    return [(IN_DOMAIN, study.in_domain), (OUT_OF_DISTRIBUTION, study_ood(study))]


def image_verdicts(image: ScoredImage) -> Verdicts:
    """What qualifies an image's score: its OOD and training-domain verdicts."""
    return [(OUT_OF_DISTRIBUTION, image.ood), (IN_DOMAIN, image.in_domain)]


def study_tracking(study: StudyResult) -> tuple[str, str]:
    """The study group's tracking identifier and tracking UID (TID 4108)."""
    return "batchscan study score", derived_uid("study group", study.study_instance_uid)


def image_tracking(image: ScoredImage) -> tuple[str, str]:
    """An image group's tracking identifier and tracking UID (TID 4108)."""
    return (
        f"batchscan image score ({image.view or 'unknown'} view)",
        derived_uid("image group", image.sop_instance_uid),
    )


def _score(value: float, verdicts: Verdicts, **kw: Any) -> hd.sr.Measurement:
    """A score (TID 300) qualified by verdicts on what it was computed from: HAS CONCEPT MOD
    CODE items (TID 300 row 2), before the image it was inferred from. The algorithm is
    named once per group (TID 1501), which covers its measurements."""
    measurement = hd.sr.Measurement(
        name=PNEUMONIA_SCORE, value=round(value, SCORE_DIGITS), unit=codes.UCUM.NoUnits, **kw
    )
    num = measurement[0]
    modifiers = [verdict_item(concept, verdict) for concept, verdict in verdicts]
    num.ContentSequence = hd.sr.ContentSequence([*modifiers, *num.get("ContentSequence", [])])
    return measurement


def algorithm_identification(algorithm: Algorithm) -> hd.sr.AlgorithmIdentification:
    """TID 4019: the algorithm's name, version (the model's) and parameters."""
    return hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME,
        version=algorithm.model_version,
        parameters=[f"threshold={algorithm.threshold:.6f}", f"batchscan={algorithm.code_version}"],
    )


def observer_context(algorithm: Algorithm) -> hd.sr.ObservationContext:
    """TID 1002/1004: the device observer, named as the Contributing Equipment item is."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid(algorithm),
                name=MANUFACTURER,
                manufacturer_name=MANUFACTURER,
                model_name=ALGORITHM_NAME,
            ),
        )
    )


def report_evaluations(flag: bool) -> hd.sr.ContainerContentItem:
    """TID 1500 rows 12 to 14: the flag (CODE) and the not-a-diagnosis text (TEXT)."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=FLAGGED,
                value=yes_no(flag),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
            hd.sr.TextContentItem(
                name=COMMENT,
                value=DISCLAIMER,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
        ]
    )
    return container


def measurement_report(
    study: StudyResult, evidence: Sequence[Dataset], algorithm: Algorithm
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree of a study's SR (see the module's docstring)."""
    algorithm_id = algorithm_identification(algorithm)
    identifier, uid = study_tracking(study)
    study_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=identifier),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm_id,
        measurements=[
            _score(study.score, study_verdicts(study)),
            hd.sr.Measurement(
                name=THRESHOLD,
                value=round(algorithm.threshold, SCORE_DIGITS),
                unit=codes.UCUM.NoUnits,
            ),
        ],
    )
    by_uid = {ds.SOPInstanceUID: ds for ds in evidence}
    image_groups = []
    for image in study.images:
        source = by_uid[image.sop_instance_uid]
        reference = hd.sr.SourceImageForMeasurement(source.SOPClassUID, source.SOPInstanceUID)
        measurements = [_score(image.score, image_verdicts(image), referenced_images=[reference])]
        if image.ood_score is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=OOD_DISTANCE,
                    value=round(image.ood_score, DISTANCE_DIGITS),
                    unit=codes.UCUM.NoUnits,
                )
            )
        identifier, uid = image_tracking(image)
        image_groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=identifier),
                finding_type=PNEUMONIA,
                algorithm_id=algorithm_id,
                measurements=measurements,
                source_images=[
                    hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)
                ],
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=observer_context(algorithm),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=[study_group, *image_groups],
        title=codes.DCM.ImagingMeasurementReport,
        referenced_images=[ds for ds in evidence if describable(ds)] or None,
    )
    report[0].ContentSequence.append(report_evaluations(study.flag))
    return report


def describable(header: Dataset) -> bool:
    """True when highdicom can describe an image in the SR's image library (TID 1601).

    The library is optional in TID 1500 (the evidence sequence and each group's source
    image reference the images already), and its entry for a projection radiograph needs
    Patient Orientation and Imager Pixel Spacing, which many real radiographs leave empty
    (a cross-sectional image needs its spacing, orientation and position). Such an image is
    left out of the library rather than described with values it does not carry; so is an
    image whose modality highdicom can only call "Other" (a secondary capture), which is no
    modality of CID 29, the entry's value set.
    """
    try:
        descriptors = hd.sr.ImageLibraryEntryDescriptors(header)
    except INTERPRETER_EXITS:
        raise
    except Exception:
        return False
    return str(descriptors[0].ConceptCodeSequence[0].CodeValue) != "OT"


def build_sr(
    study: StudyResult,
    evidence: Sequence[Dataset],
    algorithm: Algorithm,
    sop_instance_uid: str,
    instance_number: int,
    analysed_at: datetime,
) -> hd.sr.ComprehensiveSR:
    """The SR dataset of a study (complete, unverified: a machine's result), built with
    highdicom's full constructor: the reference that :mod:`batchscan.pacs.template`'s SRs
    are held equal to."""
    sr = hd.sr.ComprehensiveSR(
        evidence=list(evidence),
        content=measurement_report(study, evidence, algorithm),
        series_instance_uid=sr_series_uid(study.study_instance_uid),
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
        performed_procedure_codes=[CHEST_XRAY],
    )
    # highdicom's items: the source image's acquisition equipment (when its header names
    # one), then highdicom itself; it takes DICOM's purposes of reference only, so AIR's
    # item is put before its own here
    equipment = sr.ContributingEquipmentSequence
    equipment.insert(len(equipment) - 1, algorithm_equipment(algorithm))
    local = analysed_at.astimezone()
    sr.ContentDate, sr.ContentTime = DA(local.date()), TM(local.time())
    sr.SoftwareVersions = algorithm.code_version
    sr.ManufacturerModelName = ALGORITHM_NAME
    sr.CodingSchemeIdentificationSequence = coding_schemes()
    separate(sr)
    return sr


def separate(item: Dataset) -> Dataset:
    """Mark every container SEPARATE: its items are distinct measurements and verdicts, not
    one sentence (highdicom's default, CONTINUOUS, has viewers such as DCMTK's dsr2html run
    the values together as prose, without their names)."""
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        separate(child)
    return item


def sr_file(outbox: Path, study_instance_uid: str, sop_instance_uid: str) -> Path:
    """Where an SR lies in the outbox: one folder per study, one file per SR."""
    return outbox / study_instance_uid / f"{sop_instance_uid}.dcm"
