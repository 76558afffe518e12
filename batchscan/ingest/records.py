"""The record that flows through every stage: one per file found in the archive.

Every skip or failure is a value on the record (``status`` + ``reason``), not an exception
escaping a stage, so each file ends up as exactly one report row whatever happened to it.
Records are plain slotted dataclasses so they pickle cheaply between processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Final, Literal, TypeVar

import numpy as np

from batchscan.ingest.paths import readable

T = TypeVar("T")

Status = Literal["pending", "scored", "skipped", "failed"]

SCORED: Final = "scored"
SKIPPED: Final = "skipped"
FAILED: Final = "failed"
PENDING: Final = "pending"


#: Exceptions that mean "stop the process", which no stage may swallow. Everything else a
#: library raises on a bad file is recorded, including pyo3's PanicException (a Rust codec's
#: panic), which derives from BaseException and so slips past ``except Exception``.
INTERPRETER_EXITS: Final = (KeyboardInterrupt, SystemExit, GeneratorExit)


@dataclass(slots=True)
class ImageRecord:
    """What batchscan knows about one file.

    Attributes
    ----------
    path:
        Path relative to the archive root, ``/``-separated (the report key).
    abs_path:
        Absolute path used to open the file (never written to a report).
    size, mtime_ns:
        From the directory walk; let later runs see whether the file changed.
    status:
        ``pending`` until a stage decides; then ``scored``, ``skipped`` or ``failed``.
    reason:
        Short machine-readable reason for ``skipped``/``failed`` (``modality:CT``,
        ``decode_error:ValueError``...); None when scored.
    detail:
        Human-readable explanation of a failure (an exception message), or None.
    view:
        ``PA``, ``AP``, ``LL``... or ``unknown`` (an unknown view is scored and marked).
    view_source:
        Where the view came from: ``ViewPosition``, ``ViewCodeSequence``, ``description``.
    modality_source:
        The modality transform applied: ``modality_lut``, ``rescale``, ``identity``
        (``...:lut_invalid`` when a broken Modality LUT Sequence was ignored).
    decoder:
        What decoded the pixels (:data:`batchscan.ingest.decoders.DECODER_NAMES`).
    decode_scale:
        The power of two the image was reduced by when decoded (1 = full resolution).
    patient_key:
        HMAC-SHA256 of PatientID under the site's pseudonymisation key, only when one is
        configured (the PatientID itself never leaves the header stage).
    patient_age_years, age_group, in_domain:
        Age at the study (PatientAge, else birth and study dates; 90 and over as 90), its
        group and whether the image lies in the model's training domain
        (:mod:`batchscan.ingest.domain`); None when unknown.
    patient_sex:
        ``M``, ``F``, ``O`` from PatientSex, None otherwise.
    photometric, pixel_spacing_mm:
        Photometric Interpretation (``MONOCHROME1``, ``MONOCHROME2``...) and the row spacing
        of the pixels in mm (PixelSpacing, else ImagerPixelSpacing; None when absent or not a
        plausible radiograph's, outside 0.01-5 mm): header facts the drift monitor watches,
        because a new detector or new post-processing shows in them before it shows in the
        scores.
    manufacturer, manufacturer_model:
        The device (Manufacturer, ManufacturerModelName), for grouping scores by device.
    score:
        The model's pneumonia probability for this image, once scored.
    ood_score, ood:
        Out-of-distribution distance of the scored image from the training set
        (:mod:`batchscan.scoring.ood`) and whether it lies beyond the training set's 99th
        percentile; None when not scored or the model card has no OOD statistics.
    shadow_score:
        The shadow model's pneumonia probability (``--shadow-model``), scored on the same
        input beside the model in use; None without a shadow model.
    """

    path: str
    abs_path: str
    size: int = -1
    mtime_ns: int = -1
    status: str = PENDING
    reason: str | None = None
    detail: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    modality: str | None = None
    body_part: str | None = None
    view: str | None = None
    view_source: str | None = None
    transfer_syntax_uid: str | None = None
    rows: int | None = None
    columns: int | None = None
    photometric: str | None = None
    pixel_spacing_mm: float | None = None
    accession_number: str | None = None
    study_date: str | None = None
    voi_source: str | None = None
    modality_source: str | None = None
    decoder: str | None = None
    decode_scale: int | None = None
    patient_key: str | None = None
    patient_age_years: float | None = None
    patient_sex: str | None = None
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    age_group: str | None = None
    in_domain: bool | None = None
    score: float | None = None
    ood_score: float | None = None
    ood: bool | None = None
    shadow_score: float | None = None

    def skip(self, reason: str, detail: str | None = None) -> ImageRecord:
        """Mark as skipped (not an eligible image) and return self."""
        self.status, self.reason, self.detail = SKIPPED, reason, _shorten(detail)
        return self

    def fail(self, reason: str, detail: str | None = None) -> ImageRecord:
        """Mark as failed (eligible or unknown, but could not be read) and return self."""
        self.status, self.reason, self.detail = FAILED, reason, _shorten(detail)
        return self

    @property
    def pending(self) -> bool:
        """True while no stage has decided this record's fate."""
        return self.status == PENDING


@dataclass(frozen=True, slots=True)
class Scores:
    """What the scoring stage gives for N model inputs.

    Attributes
    ----------
    score:
        Pneumonia probabilities, float64 (N,).
    ood_score:
        Out-of-distribution distances, float64 (N,), or None when the model has no OOD
        statistics.
    ood_threshold:
        The distance above which an image is ``ood`` (from the card), or None.
    shadow:
        The shadow model's probabilities, float64 (N,), or None without one.
    """

    score: np.ndarray
    ood_score: np.ndarray | None = None
    ood_threshold: float | None = None
    shadow: np.ndarray | None = None

    def apply(self, record: ImageRecord, i: int) -> None:
        """Mark `record` scored with the `i`-th score, OOD distance and shadow score."""
        record.status, record.reason, record.score = SCORED, None, float(self.score[i])
        record.shadow_score = None if self.shadow is None else float(self.shadow[i])
        if self.ood_score is not None and self.ood_threshold is not None:
            distance = float(self.ood_score[i])
            record.ood_score, record.ood = distance, distance > self.ood_threshold


def _shorten(text: str | None, limit: int = 200) -> str | None:
    """Keep details to one short line of valid UTF-8 (they land in reports and cron mail,
    and a codec's message may quote a file name that is not UTF-8)."""
    if text is None:
        return None
    line = readable(" ".join(str(text).split()))
    return line if len(line) <= limit else line[: limit - 3] + "..."


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items from a stream (the last may be shorter); the
    stream is never held whole, so an archive of millions of records stays a stream."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
