"""Synthetic DICOM radiographs for the tests, the demo archive and the benchmark.

The pictures are chest-like phantoms (body, two lungs, mediastinum, ribs, an optional
pneumonia-like opacity), written as real DICOM with pydicom in any transfer syntax this
install can encode: explicit/implicit little endian, explicit big endian, deflated, RLE,
JPEG-LS lossless and near-lossless, JPEG 2000 lossless and lossy (pydicom's encoders), and
JPEG baseline 8-bit (Pillow's encoder, encapsulated with pydicom). The headers look like a
hospital's: CR or DX (or CT to be skipped), PA or lateral, MONOCHROME1 or 2, 12/15/16 bits,
patient name and birth date present (so tests can prove they never reach a report).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Final

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

#: Syntaxes whose pixels come back bit-identical.
LOSSLESS_SYNTAXES: Final = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    HTJ2KLossless,
)
#: Syntaxes pydicom has no encoder for, written through imagecodecs (libjpeg-turbo 3 for
#: JPEG lossless, with predictor 1 for SV1 and 6 for process 14; OpenJPH for HTJ2K).
_IMAGECODECS: Final = {JPEGLossless: 6, JPEGLosslessSV1: 1, HTJ2KLossless: 0}
LOSSY_SYNTAXES: Final = (JPEGLSNearLossless, JPEG2000, JPEGBaseline8Bit)
ALL_SYNTAXES: Final = LOSSLESS_SYNTAXES + LOSSY_SYNTAXES
_NATIVE: Final = {
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
}
SOP_CLASS: Final = {
    "CR": UID("1.2.840.10008.5.1.4.1.1.1"),
    "DX": UID("1.2.840.10008.5.1.4.1.1.1.1"),
    "CT": UID("1.2.840.10008.5.1.4.1.1.2"),
}


def chest_phantom(
    size: int | tuple[int, int] = 512, *, seed: int = 0, opacity: float = 0.0
) -> np.ndarray:
    """A chest-radiograph-like picture, float32 in [0, 1], 0 = black (display sense).

    Parameters
    ----------
    size:
        Side (or (rows, columns)) in pixels.
    seed:
        Varies anatomy slightly and the noise.
    opacity:
        0 for clear lungs; up to 1 for a dense pneumonia-like consolidation in one lung.
    """
    rows, cols = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    y, x = y / rows - 0.5, x / cols - 0.5
    jitter = rng.uniform(-0.02, 0.02, 4).astype(np.float32)
    body = ((x / (0.42 + jitter[0])) ** 2 + (y / 0.55) ** 2) < 1.0
    img = np.where(body, 0.62, 0.04).astype(np.float32)
    for side in (-1, 1):
        lung = ((x - side * (0.18 + jitter[1])) / 0.14) ** 2 + ((y + 0.02) / (0.3 + jitter[2])) ** 2
        img = np.where(lung < 1.0, 0.22 + 0.05 * (y + 0.3), img)
    ribs = 0.08 * (np.sin((y * 26 + np.abs(x) * 6) * np.pi) > 0.6) * (np.abs(x) < 0.34)
    img = img + ribs * body
    mediastinum = (np.abs(x + 0.02) < 0.07 + 0.09 * (y > 0.05)) & (np.abs(y) < 0.32)
    img = np.where(mediastinum, 0.75, img)
    img = np.where((np.abs(x) < 0.025) & body, 0.85, img)  # spine
    if opacity > 0:
        cy, cx = rng.uniform(-0.05, 0.15), rng.choice([-0.18, 0.18])
        blob = np.exp(-(((x - cx) / 0.08) ** 2 + ((y - cy) / 0.11) ** 2))
        img = img + opacity * 0.45 * blob * body
    img = img + rng.normal(0.0, 0.015, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


@dataclass(slots=True)
class RadiographSpec:
    """Header and encoding choices of one synthetic file."""

    modality: str = "CR"
    view: str | None = "PA"
    body_part: str | None = "CHEST"
    photometric: str = "MONOCHROME2"
    bits_stored: int = 12
    transfer_syntax: str = ExplicitVRLittleEndian
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    sop_uid: str = field(default_factory=generate_uid)
    accession: str = "ACC0001"
    study_date: str = "20260115"
    study_description: str = "CHEST 2 VIEWS"
    patient_name: str = "DOE^JANE"
    patient_birth_date: str = "19700101"
    patient_id: str = "PAT0001"
    window: tuple[float, float] | None = None  # (center, width) in stored values
    padding_value: int | None = None
    patient_age: str | None = None  # an AS value such as 004Y
    patient_sex: str = "F"
    manufacturer: str = "BATCHSCAN"
    manufacturer_model: str = "Phantom CR 1"


def stored_values(display: np.ndarray, spec: RadiographSpec) -> np.ndarray:
    """Map a display picture to stored values as a detector would (MONOCHROME1 inverted)."""
    if spec.transfer_syntax == JPEGBaseline8Bit:
        spec.bits_stored = 8
    top = 2**spec.bits_stored - 1
    picture = 1.0 - display if spec.photometric == "MONOCHROME1" else display
    dtype = np.uint8 if spec.bits_stored <= 8 else np.uint16
    return np.rint(picture * top).astype(dtype)


def build_dataset(pixels: np.ndarray, spec: RadiographSpec) -> Dataset:
    """A complete uncompressed dataset for `pixels` (stored values) as described by `spec`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = SOP_CLASS[spec.modality]
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = spec.sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1234.1")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = spec.sop_uid
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.Modality = spec.modality
    ds.PatientName = spec.patient_name
    ds.PatientBirthDate = spec.patient_birth_date
    ds.PatientID = spec.patient_id
    if spec.patient_age is not None:
        ds.PatientAge = spec.patient_age
    ds.PatientSex = spec.patient_sex
    ds.Manufacturer = spec.manufacturer
    ds.ManufacturerModelName = spec.manufacturer_model
    ds.AccessionNumber = spec.accession
    ds.StudyDate = spec.study_date
    ds.StudyTime = "101500"
    ds.StudyDescription = spec.study_description
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if spec.body_part is not None:
        ds.BodyPartExamined = spec.body_part
    if spec.view is not None:
        ds.ViewPosition = spec.view
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = 0
    if spec.window is not None:
        ds.WindowCenter, ds.WindowWidth = spec.window
    if spec.padding_value is not None:
        ds.PixelPaddingValue = spec.padding_value
    ds.PixelData = pixels.tobytes()
    return ds


def encode(ds: Dataset, pixels: np.ndarray, transfer_syntax: str) -> Dataset:
    """Re-encode `ds` in `transfer_syntax` (compressed ones through pydicom's encoders)."""
    uid = UID(transfer_syntax)
    if uid in _NATIVE:
        ds.file_meta.TransferSyntaxUID = uid
        if uid == ExplicitVRBigEndian:
            ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
        return ds
    if uid == JPEGBaseline8Bit:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, "JPEG", quality=92)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = uid
        ds.LossyImageCompression = "01"
        return ds
    if uid in _IMAGECODECS:
        import imagecodecs

        if uid == HTJ2KLossless:
            frame = imagecodecs.htj2k_encode(pixels, reversible=True)
        else:
            frame = imagecodecs.jpeg8_encode(
                pixels,
                lossless=True,
                predictor=_IMAGECODECS[uid],
                bitspersample=int(ds.BitsStored),
            )
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = uid
        return ds
    kwargs: dict[str, object] = {}
    if uid == JPEG2000:
        kwargs["j2k_cr"] = [20]
    elif uid == JPEGLSNearLossless:
        kwargs["jls_error"] = 2
    ds.compress(uid, pixels, encoding_plugin="", **kwargs)
    return ds


def write_radiograph(path: Path | str, display: np.ndarray, spec: RadiographSpec) -> Path:
    """Write `display` (float [0, 1]) as a DICOM file at `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = stored_values(display, spec)
    ds = encode(build_dataset(pixels, spec), pixels, spec.transfer_syntax)
    little = ds.file_meta.TransferSyntaxUID != ExplicitVRBigEndian
    implicit = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True, little_endian=little, implicit_vr=implicit)
    return path


#: The header window under which 8-bit stored values v display as exactly v / 255, the
#: way the training pictures were read (DICOM's linear window: (v - 127.5) / 255 + 0.5).
UINT8_WINDOW: Final = (128.0, 256.0)
#: Header of the labels files written here, as ``batchscan evaluate`` reads them.
LABEL_COLUMNS: Final = ("accession_number", "label")


def write_labelled_studies(
    root: Path | str,
    pictures: list[np.ndarray] | np.ndarray,
    labels: list[int] | np.ndarray,
    *,
    prefix: str,
    views: list[str] | None = None,
    ages: list[str | None] | None = None,
    patient_ids: list[str] | None = None,
    modality: str = "CR",
    study_dates: list[str] | None = None,
) -> list[tuple[str, int]]:
    """Write 8-bit pictures (uint8, 0 = black) as one-image studies, a hospital's way.

    Each picture becomes ``<root>/<accession>/IM0001`` in its own study, with accession
    ``<prefix><index:06d>``, the view and PatientAge given (AP and none by default), and
    the window :data:`UINT8_WINDOW`, so that the scan's display image is the picture
    itself; PatientID from `patient_ids` (one patient per study by default), StudyDate from
    `study_dates` (``YYYYMMDD``; 2026-01-15 by default). Returns the
    (accession, label) rows for a labels file (:func:`write_labels`).
    """
    root = Path(root)
    rows: list[tuple[str, int]] = []
    for i, (picture, label) in enumerate(zip(pictures, labels, strict=True)):
        accession = f"{prefix}{i:06d}"
        spec = RadiographSpec(
            modality=modality,
            view=views[i] if views is not None else "AP",
            bits_stored=8,
            accession=accession,
            study_description="CHEST",
            patient_name="ANON",
            patient_birth_date="",
            patient_id=patient_ids[i] if patient_ids is not None else f"{prefix}P{i:06d}",
            window=UINT8_WINDOW,
            patient_age=ages[i] if ages is not None else None,
            **({"study_date": study_dates[i]} if study_dates is not None else {}),
        )
        pixels = np.asarray(picture, dtype=np.uint8)
        ds = build_dataset(pixels, spec)
        path = root / accession / "IM0001"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        rows.append((accession, int(label)))
    return rows


def write_labels(path: Path | str, rows: list[tuple[str, int]]) -> Path:
    """Write a labels file (``accession_number,label``; 1 = pneumonia, 0 = normal)."""
    path = Path(path)
    lines = [",".join(LABEL_COLUMNS)] + [f"{accession},{label}" for accession, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


#: Radiology reports of the demo's studies, as a RIS export would give them: normal studies
#: first, then pneumonia, one of them hedged (``batchscan labels`` calls it uncertain).
DEMO_REPORTS: Final = (
    (
        "INDICATION: Cough.\nCOMPARISON: None.\nFINDINGS: The heart is normal in size. The "
        "lungs are clear without focal consolidation. No pleural effusion or pneumothorax.\n"
        "IMPRESSION: No acute cardiopulmonary process.",
        "INDICATION: Fever, rule out pneumonia.\nFINDINGS: Lungs are well expanded and clear. "
        "No infiltrate.\nIMPRESSION: No evidence of pneumonia.",
        "FINDINGS: Mild streaky opacity at the left base, likely atelectasis. No focal "
        "airspace disease.\nIMPRESSION: Minimal left basilar atelectasis. No pneumonia.",
    ),
    (
        "INDICATION: Fever and cough.\nFINDINGS: Airspace consolidation in the right lower "
        "lobe with air bronchograms.\nIMPRESSION: Right lower lobe pneumonia.",
        "FINDINGS: Patchy opacity in the left lower lobe.\nIMPRESSION: Left lower lobe "
        "opacity, atelectasis versus early pneumonia.",
        "FINDINGS: Dense consolidation in the right middle lobe.\nIMPRESSION: Findings "
        "consistent with right middle lobe pneumonia.",
    ),
)


def write_reports(path: Path | str, rows: list[tuple[str, str]]) -> Path:
    """Write a reports file as ``batchscan labels`` reads it (``accession_number,report``;
    quoted multi-line text)."""
    path = Path(path)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("accession_number", "report"))
        writer.writerows(rows)
    return path


def write_demo_archive(root: Path | str, *, size: int = 1024, studies: int = 6) -> list[Path]:
    """A small realistic archive: what ``batchscan demo`` writes.

    Per study a PA (or AP) and a lateral, CR or DX, in rotating transfer syntaxes, nested as
    ``<year>/<accession>/<series>/<file>``; plus a CT slice (skipped), a DICOMDIR-free
    report text file (not DICOM), a truncated radiograph (failed) and a nested empty file.
    Half of the studies carry a pneumonia-like opacity; ``labels.csv`` says which (1), as a
    hospital's labels file for ``batchscan evaluate`` would, and ``reports.csv`` holds a
    radiology report per study for ``batchscan labels`` (neither is DICOM).
    """
    root = Path(root)
    written: list[Path] = []
    syntaxes = [s for s in ALL_SYNTAXES if s != JPEGLSNearLossless]
    for i in range(studies):
        accession = f"ACC{1000 + i}"
        study_uid = generate_uid()
        modality = "CR" if i % 2 == 0 else "DX"
        photometric = "MONOCHROME1" if i % 3 == 0 else "MONOCHROME2"
        bits = (12, 15, 16)[i % 3]
        opacity = 0.9 if i % 2 == 1 else 0.0
        for j, view in enumerate(("PA" if i != 4 else "AP", "LL")):
            syntax = syntaxes[(2 * i + j) % len(syntaxes)]
            depth = 8 if syntax == JPEGBaseline8Bit else bits
            spec = RadiographSpec(
                modality=modality,
                view=view,
                photometric=photometric,
                bits_stored=depth,
                transfer_syntax=syntax,
                study_uid=study_uid,
                accession=accession,
                study_date=f"2026{1 + i % 12:02d}{10 + i % 18:02d}",  # a real date
                patient_name=f"DEMO^PATIENT{i}",
                patient_id=f"DEMO{i:04d}",
                window=(2 ** (depth - 1), 2**depth) if i % 2 == 0 else None,
                patient_sex="MF"[i % 2],
                manufacturer=("ACME Imaging", "Northwind Medical")[i % 2],
                manufacturer_model=("Radiant CR 300", "Lumen DX 2")[i % 2],
            )
            picture = chest_phantom(size, seed=100 * i + j, opacity=opacity)
            name = f"{2025 + i % 2}/{accession}/{j + 1}/IM{j:04d}"
            written.append(write_radiograph(root / name, picture, spec))
    ct = RadiographSpec(
        modality="CT", view=None, body_part="CHEST", bits_stored=12, study_description="CT THORAX"
    )
    written.append(write_radiograph(root / "2026/CT/slice001.dcm", chest_phantom(256), ct))
    broken = write_radiograph(
        root / "2026/broken/IM0001",
        chest_phantom(512, seed=7),
        RadiographSpec(study_description="CHEST PA"),
    )
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # an interrupted transfer
    written.append(broken)
    notes = root / "2026/README.txt"
    notes.write_text("Export from PACS, not DICOM.\n")
    written.append(notes)
    labels = [(f"ACC{1000 + i}", int(i % 2 == 1)) for i in range(studies)]
    written.append(write_labels(root / "labels.csv", labels))
    reports = [(a, DEMO_REPORTS[label][i // 2 % 3]) for i, (a, label) in enumerate(labels)]
    written.append(write_reports(root / "reports.csv", reports))
    return written


def write_shifting_archive(
    root: Path | str,
    *,
    weeks: int = 12,
    per_week: int = 35,
    shift_week: int = 9,
    size: int = 128,
    start: date = date(2026, 1, 5),
) -> int:
    """An archive in which the drift monitor has something to find: one-image AP chest
    studies of children on the weekdays of `weeks` weeks from `start` (a Monday),
    `per_week` a week, from two CR devices; from week `shift_week` (1 = the first) on, half
    of the studies come from a new DX detector (``ACME DR-9``, JPEG-LS) whose films are
    processed otherwise (gamma 1.8, a tighter shutter). A quarter of the studies carry an
    opacity. Returns the number of studies written (tests/test_drift.py,
    jobs/experiments/report_check.py)."""
    root = Path(root)
    rng = np.random.default_rng(39)
    devices = (("Globex", "Radiant CR 300", "CR"), ("Initech", "Lumen CR 5", "CR"))
    n = weeks * per_week
    for i in range(n):
        week, nth = divmod(i, per_week)
        day = start + timedelta(weeks=week, days=nth % 5)
        shifted = week + 1 >= shift_week and rng.random() < 0.5
        manufacturer, model, modality = ("ACME", "DR-9", "DX") if shifted else devices[i % 2]
        picture = chest_phantom(size, seed=5000 + i, opacity=0.9 * (rng.random() < 0.25))
        if shifted:
            edge = size // 8
            picture = np.pad(picture[edge:-edge, edge:-edge] ** 1.8, edge)
        spec = RadiographSpec(
            modality=modality,
            view="AP",
            transfer_syntax=JPEGLSLossless if shifted else ExplicitVRLittleEndian,
            accession=f"SH{i:06d}",
            study_date=day.strftime("%Y%m%d"),
            patient_id=f"SHP{i:06d}",
            patient_age=f"{int(rng.integers(1, 6)):03d}Y",
            patient_sex="MF"[i % 2],
            manufacturer=manufacturer,
            manufacturer_model=model,
            window=(2048, 4096),
        )
        write_radiograph(root / f"{day:%Y%m%d}/SH{i:06d}/IM0001", picture, spec)
    return n
