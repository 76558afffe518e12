#!/usr/bin/env python3
"""report.html looked at as a person would, and what it costs on a large state.

Usage:
    python jobs/experiments/report_check.py screenshots [--out DIR] [--studies 160]
    python jobs/experiments/report_check.py cost [--files 100000] [--repeat 3]

screenshots: scans the demo archive, a larger generated one (--studies studies over 26
weeks, three devices, children and adults, scanned twice so there is a run history) and one
in which the drift monitor has something to find (``batchscan.synth.write_shifting_archive``:
12 weeks of 35 studies, a new detector from the ninth, scanned with --monitor-period week),
then renders each report.html to PNG with headless Chromium (Debian's ``chromium``: apt-get
install chromium) at a desktop width, full page, into --out. Look at the PNGs.

cost: builds a state of --files file rows (half of them scored, studies of four images, all
hard links to a few real DICOM files so that thumbnails are really decoded) and times
``batchscan report`` on it against the time to write the Parquet reports from the same
state, in the same run: thumbnails only (the page before maps), no pictures, maps made with
the model already loaded (as at the end of a scan that scored), and maps taken from the
previous page's figures (a nightly run whose top studies did not change); prints a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from batchscan.synth import (
    RadiographSpec,
    chest_phantom,
    write_demo_archive,
    write_radiograph,
    write_shifting_archive,
)

DEVICES = [
    ("ACME Imaging", "Radiant CR 300", "CR"),
    ("Northwind Medical", "Lumen DX 2", "DX"),
    ("Contoso Health", "Clarity DR 9", "DX"),
]


def _batchscan(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "batchscan.cli", *args], capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"batchscan {' '.join(args)} failed:\n{done.stderr.decode()}")


def _varied_archive(root: Path, studies: int, size: int = 256, first: int = 0) -> None:
    """Studies spread over 26 weeks, three devices, children and adults, some with an
    opacity, a frontal and (every third study) a lateral each."""
    rng = np.random.default_rng(7 + first)
    start = date(2026, 5, 4)
    for i in range(first, first + studies):
        manufacturer, model, modality = DEVICES[i % len(DEVICES)]
        day = start + timedelta(days=int(rng.integers(0, 182)))
        child = rng.random() < 0.4
        age = f"{int(rng.integers(1, 6)):03d}Y" if child else f"{int(rng.integers(20, 90)):03d}Y"
        opacity = 0.9 if rng.random() < 0.35 else 0.0
        uid = f"2.25.{10**20 + i}"
        views = ["AP" if child else "PA"] + (["LL"] if i % 3 == 0 else [])
        for j, view in enumerate(views):
            spec = RadiographSpec(
                modality=modality,
                view=view,
                study_uid=uid,
                accession=f"ACC{20000 + i}",
                study_date=day.strftime("%Y%m%d"),
                patient_age=age,
                patient_sex="MF"[i % 2],
                manufacturer=manufacturer,
                manufacturer_model=model,
                window=(2048, 4096),
            )
            picture = chest_phantom(size, seed=1000 + 10 * i + j, opacity=opacity)
            write_radiograph(root / f"{day:%Y/%m}/ACC{20000 + i}/IM{j}", picture, spec)


def _screenshot(page: Path, png: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--window-size=1280,9000",
                f"--screenshot={png}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    _trim(png)


def _trim(png: Path) -> None:
    """Cut the blank space below the page (the window is taller than any report)."""
    from PIL import Image, ImageOps

    with Image.open(png) as image:
        box = ImageOps.invert(image.convert("L")).getbbox()
        if box:
            image.crop((0, 0, image.width, min(image.height, box[3] + 20))).save(png)


def screenshots(out: Path, studies: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="batchscan-report-"))
    write_demo_archive(work / "demo")
    _batchscan("scan", str(work / "demo"), "--out", str(work / "demo_reports"), "--no-progress")
    _screenshot(work / "demo_reports/report.html", out / "report_demo.png")
    archive = work / "varied"
    _varied_archive(archive, studies // 2)
    _batchscan("scan", str(archive), "--out", str(work / "varied_reports"), "--no-progress")
    _varied_archive(archive / "later", studies - studies // 2, first=studies // 2)  # next night
    _batchscan("scan", str(archive), "--out", str(work / "varied_reports"), "--no-progress")
    _screenshot(work / "varied_reports/report.html", out / "report_varied.png")
    write_shifting_archive(work / "shifting")
    shifting = ("--out", str(work / "shifting_reports"), "--monitor-period", "week")
    _batchscan("scan", str(work / "shifting"), *shifting, "--no-progress")
    _screenshot(work / "shifting_reports/report.html", out / "report_drift.png")
    for name in ("report_demo.png", "report_varied.png", "report_drift.png"):
        print(out / name)


def cost(files: int, repeat: int) -> None:
    from batchscan.ingest.records import ImageRecord
    from batchscan.results.aggregate import aggregate_studies
    from batchscan.results.report import write_images, write_studies
    from batchscan.results.report_html import FIGURES_FILE, ReportInputs, write_report
    from batchscan.results.saliency import Explainer
    from batchscan.results.state import StateStore
    from batchscan.scoring.model import check_model, load_model

    work = Path(tempfile.mkdtemp(prefix="batchscan-report-cost-"))
    archive = work / "archive"
    archive.mkdir()
    # a filesystem allows some 65,000 links to one file: link to a few (different pictures)
    sources = [
        write_radiograph(work / f"src{k}.dcm", chest_phantom(512, seed=k), RadiographSpec())
        for k in range(1 + files // 50_000)
    ]
    rng = np.random.default_rng(0)
    records = []
    for i in range(files):
        name = f"f{i:07d}"
        source = sources[i % len(sources)]
        os.link(source, archive / name)
        scored = i % 2 == 0
        manufacturer, model, modality = DEVICES[i % 3]
        record = ImageRecord(
            path=name,
            abs_path=str(archive / name),
            size=source.stat().st_size,
            mtime_ns=0,
            study_instance_uid=f"2.25.{i // 4}",
            sop_instance_uid=f"2.25.9{i}",
            modality=modality,
            view="PA" if scored else "LL",
            accession_number=f"A{i // 4}",
            study_date=(date(2025, 1, 1) + timedelta(days=int(i // 4) % 700)).isoformat(),
            manufacturer=manufacturer,
            manufacturer_model=model,
            age_group="adult",
            in_domain=False,
        )
        if scored:
            record.status, record.score = "scored", float(rng.random())
            record.ood_score, record.ood = 5.0, False
        else:
            record.status, record.reason = "skipped", "view:LL"
        records.append(record)
    state = StateStore(work / "state.sqlite")
    state.begin_run("r1", "2026-11-24T00:00:00+00:00", "m-1", "x")
    state.save(records, "r1", "key", "m-1")
    threshold = check_model().threshold
    finished = state.finish(
        "r1", lambda frame: aggregate_studies(frame, threshold=threshold, model_version="m-1")
    )
    counts = state.study_counts()
    manifest = {
        "run_id": "r1",
        "finished_at": "2026-11-24T00:10:00+00:00",
        "files_found": finished.files,
        "files_processed": finished.files,
        "files_reused": 0,
        "counts_by_status": dict(finished.by_status),
        "counts_by_reason": dict(finished.by_reason),
        "arguments": {"archive": str(archive), "min_edge": 64, "max_pixel_bytes": 2**29},
        "model": {"version": "m-1", "threshold": threshold, "path": "x"},
        **counts,
    }
    state.end_run("r1", "ok", {"finished_at": manifest["finished_at"], **counts})
    inputs = ReportInputs(work, manifest, check_model().card, archive)
    no_pictures = ReportInputs(work, manifest, check_model().card, None)
    # as at the end of a scan: the run has loaded the model to score, and hands it over
    loaded = load_model()
    with_maps = ReportInputs(
        work, manifest, check_model().card, archive, explainer=lambda: Explainer(loaded.keras_model)
    )
    figures = work / FIGURES_FILE

    def timed(action, fresh: bool = True) -> float:
        best = float("inf")
        for _ in range(repeat):
            if fresh:  # no figure kept from a previous page
                figures.unlink(missing_ok=True)
            started = time.perf_counter()
            action()
            best = min(best, time.perf_counter() - started)
        return best

    parquet = timed(
        lambda: (
            write_images(state.image_rows(), work, "t", patient_key=False),
            write_studies(state.study_rows(), work, "t", patient_key=False),
        )
    )
    page = timed(lambda: write_report(state, inputs))
    bare = timed(lambda: write_report(state, no_pictures))
    maps = timed(lambda: write_report(state, with_maps))
    size = (work / ".report.html.tmp").stat().st_size
    again = timed(lambda: write_report(state, with_maps), fresh=False)
    state.close()
    print(f"state: {files} files, {counts['studies']} studies ({work})")
    print(f"| what | seconds (best of {repeat}) | x Parquet reports |")
    print("|---|---|---|")
    print(f"| images.parquet + studies reports | {parquet:.2f} | 1.00 |")
    print(f"| report.html, thumbnails only (before maps) | {page:.2f} | {page / parquet:.2f} |")
    print(f"| report.html, without pictures | {bare:.2f} | {bare / parquet:.2f} |")
    print(
        f"| report.html, maps made (model loaded by the run) | {maps:.2f} | {maps / parquet:.2f} |"
    )
    print(
        f"| report.html, maps from the last page's figures | {again:.2f} | {again / parquet:.2f} |"
    )
    print(f"report.html size with maps: {size / 1e3:.0f} kB")
    shutil.rmtree(work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    shots = sub.add_parser("screenshots")
    shots.add_argument("--out", type=Path, default=Path("report_screenshots"))
    shots.add_argument("--studies", type=int, default=160)
    costs = sub.add_parser("cost")
    costs.add_argument("--files", type=int, default=100_000)
    costs.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if args.what == "screenshots":
        screenshots(args.out, args.studies)
    else:
        cost(args.files, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
