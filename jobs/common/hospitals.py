"""Simulated hospitals made from ``kermany_224`` (the pediatric source of the shipped model's
training data), for the experiments that measure ``batchscan train`` and ``batchscan adapt``
(jobs/experiments/adapt_levers.py, base64_check.py, lung_evidence.py, shortcut_check.py,
site_training_check.py, tta_check.py) and for the tests that need such a hospital.

Why here: the experiments measured the same hospitals, and a test fixture must not come from
an experiment script; one copy of the patient pattern, the shifted processing, the marker and
the hospital archive keeps their figures comparable.

A hospital of :func:`kermany_hospital` is a DICOM archive of one-image studies with a
radiology report per study (the text says pneumonia or normal as the label does): its train
images are the training period (study dates in 2025, adapted with ``--until`` :data:`UNTIL`),
its test images the later studies (2026). PatientID comes from the file names, so a split is
by patient. The kinds:

* ``kermany``: the source as it is (AP and PA assigned at random, half each): the shipped
  model already learned these pictures at 28 px, so adaptation has little to add;
* ``shifted``: the same pictures as another hospital's processing would show them
  (:func:`shifted`): the shipped model reads them backwards;
* ``marker``: in the training period normal films are mostly AP (:data:`AP_SHARE`) and every
  AP film carries a burnt-in "AP" marker (:func:`with_marker`); later films keep the views
  without the marker.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from batchscan.synth import DEMO_REPORTS, write_labelled_studies, write_reports

#: The patient in a ``kermany_224`` file name (``person123_...``, ``IM-0001-...``).
PATIENT = re.compile(r"(person\d+)|((?:NORMAL2-)?IM-\d+)")
#: The last study date of a hospital's training period.
UNTIL = date(2025, 12, 31)
HOSPITALS = ("kermany", "shifted", "marker")
#: Share of AP films among normal and among pneumonia studies of the ``marker`` hospital.
AP_SHARE = {0: 0.85, 1: 0.25}
#: Report texts that the labeler reads as normal and as pneumonia (the hedged one is left out).
REPORT_TEXTS = {
    0: (DEMO_REPORTS[0][0], DEMO_REPORTS[0][1]),
    1: (DEMO_REPORTS[1][0], DEMO_REPORTS[1][2]),
}


def run_batchscan(*args: str) -> str:
    """Run ``batchscan ARGS`` (this interpreter's), print the command and its seconds, and
    return what it printed; a failure ends the job with its stderr."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "batchscan.cli", *args], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"batchscan {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    print(f"$ batchscan {' '.join(args)}   ({time.perf_counter() - started:.0f} s)")
    return done.stdout


def patient_of(path: str) -> str | None:
    """The patient a ``kermany_224`` file name names, or None."""
    match = PATIENT.search(Path(path).name)
    return match.group(0) if match else None


def patient_ids(paths: Iterable[str], prefix: str) -> list[str]:
    """A PatientID per file: `prefix` and its patient (its stem when the name names none)."""
    return [f"{prefix}-{patient_of(p) or Path(p).stem}" for p in paths]


def shifted(picture: np.ndarray) -> np.ndarray:
    """Another hospital's processing: inverted grey levels, flattened contrast
    (``1 - x ** 0.6``)."""
    return np.rint(255 * (1 - (picture / 255.0) ** 0.6)).astype(np.uint8)


def with_marker(picture: np.ndarray) -> np.ndarray:
    """The picture with a bright "AP" burnt into its top right corner."""
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    side = picture.shape[1]
    font = ImageFont.load_default(size=max(side // 6, 10))
    draw.text((side - side // 3, side // 20), "AP", fill=255, font=font)
    return np.asarray(image)


def write_hospital(
    target: Path,
    pictures: list[np.ndarray],
    labels: list[int],
    views: list[str],
    patients: list[str],
    later: list[bool],
    *,
    prefix: str = "H",
) -> tuple[Path, Path]:
    """Write a hospital: its archive (one-image DX studies, the earlier ones dated through
    2025, the `later` ones in the first quarter of 2026) and its RIS export (a report per
    study that says what its label says). Returns (archive, reports file)."""
    earlier_n = sum(1 for x in later if not x)
    later_n = len(later) - earlier_n
    dates, e, k = [], 0, 0
    for is_later in later:
        if is_later:
            day = date(2026, 1, 2) + timedelta(days=int(88 * k / max(later_n, 1)))
            k += 1
        else:
            day = date(2025, 1, 1) + timedelta(days=int(364 * e / max(earlier_n, 1)))
            e += 1
        dates.append(day.strftime("%Y%m%d"))
    archive = target / "archive"
    rows = write_labelled_studies(
        archive,
        pictures,
        labels,
        prefix=prefix,
        views=views,
        patient_ids=patients,
        modality="DX",
        study_dates=dates,
    )
    reports = [(a, REPORT_TEXTS[y][i % 2]) for i, (a, y) in enumerate(rows)]
    return archive, write_reports(target / "ris.csv", reports)


def kermany_hospital(
    data: Path, kind: str, target: Path, limit: int | None = None, seed: int = 0
) -> tuple[Path, Path]:
    """One of the simulated hospitals (see the module's description) from ``kermany_224``
    at `data`; `limit` keeps that many studies of each period (drawn with `seed`)."""
    with (data / "labels.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    rng = np.random.default_rng(seed)
    chosen = []
    for split in ("train", "test"):
        rows = [r for r in table if r["split"] == split]
        if limit is not None and limit < len(rows):
            rows = [rows[i] for i in sorted(rng.choice(len(rows), limit, replace=False))]
        chosen += rows
    labels = [int(r["label"] == "PNEUMONIA") for r in chosen]
    later = [r["split"] == "test" for r in chosen]
    if kind == "marker":
        views = ["AP" if rng.random() < AP_SHARE[y] else "PA" for y in labels]
    else:
        views = ["AP" if rng.random() < 0.5 else "PA" for _ in labels]
    pictures = []
    for r, view, is_later in zip(chosen, views, later, strict=True):
        picture = np.asarray(Image.open(data / r["path"]).convert("L"))
        if kind == "shifted":
            picture = shifted(picture)
        elif kind == "marker" and view == "AP" and not is_later:
            picture = with_marker(picture)
        pictures.append(picture)
    patients = patient_ids((r["path"] for r in chosen), kind)
    return write_hospital(target, pictures, labels, views, patients, later)


def scan_hospital(work: Path, data: Path, kind: str, limit: int | None = None) -> Path:
    """Build hospital `kind` under `work` and scan it for real (``batchscan scan
    --reports-file``, with a pseudonym key: the input store and the report labels are
    filled); once: a REPORT_DIR already there is reused. Returns the REPORT_DIR."""
    target = work / kind
    out = target / "reports"
    if (out / "manifest.json").is_file():
        return out
    archive, reports = kermany_hospital(data, kind, target, limit)
    key = target / "pseudonym.key"
    key.write_bytes(os.urandom(32))
    run_batchscan(
        "scan", str(archive), "--out", str(out), "--reports-file", str(reports),
        "--pseudonym-key-file", str(key), "--no-progress",
    )  # fmt: skip
    return out
