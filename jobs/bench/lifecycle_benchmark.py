#!/usr/bin/env python3
"""The model's life at archive scale: what a model change, a shadow run and a night of new
reports cost, against reading the archive again.

Usage:
    python jobs/bench/lifecycle_benchmark.py [--files 600] [--size 2048] [--workers N]

Writes an archive of --files full-size chest-like radiographs (--size px, 12-bit), half
uncompressed and half JPEG 2000 lossless, one study each with its own UIDs and accession
over six months, and a site model (the shipped model with its output layer moved). Then,
each step a real ``batchscan scan`` command run under ``strace -f --seccomp-bpf -e
trace=openat`` (cheap: only openat stops), which counts the archive files the scan and its
decode processes open:

  first scan       an empty REPORT_DIR: every file read (the baseline)
  re-read          --model SITE into a new REPORT_DIR: what a model change cost before the
                   input store (and still costs a site without one)
  model change     --model SITE into the first scan's REPORT_DIR: scored from the store
  shadow run       --model SITE --shadow-model SHIPPED: the second model from the store
  first reports    --reports-file with a report for every study: labelled, measured
  new reports      the next night: 10 % of the reports new or rewritten, no new film

Every step runs on the archive and on a quarter of it (hardlinks): images/s is the marginal
rate of the work between the two (the seconds of reading and scoring, or rescoring, in the
manifest's ``seconds_by_stage``, less loading TensorFlow and the models and the first call
at each batch shape, which XLA compiles), so that what does not grow with the archive
cancels; those are the "fixed" seconds (with start-up and report writing). For each step:
wall time, images scored, that rate (x against the re-read, in the same run), archive files
opened and bytes read from the archive (the sizes of the files opened; the
stages read a file whole), and at the end the store's bytes per image and the projection
of each step to a million images at the measured rates. Bytes opened by report.html's
pictures (a dozen files) are counted too: they are what a step opens "beyond" the stages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/, for common/
from common.site_model import site_model

from batchscan.engines.pipeline import default_workers
from batchscan.scoring.model import default_model_path
from batchscan.synth import (
    DEMO_REPORTS,
    RadiographSpec,
    build_dataset,
    chest_phantom,
    encode,
    stored_values,
    write_reports,
)

SYNTAXES = {"uncompressed": ExplicitVRLittleEndian, "j2k-lossless": JPEG2000Lossless}
DISTINCT = 8


def write_archive(root: Path, files: int, size: int) -> list[str]:
    """`files` one-image studies, half per syntax; 8 distinct pictures per syntax, encoded
    once, written under fresh UIDs, accessions and study dates. Returns the accessions."""
    accessions = []
    per_syntax = files // len(SYNTAXES)
    for s, (name, syntax) in enumerate(SYNTAXES.items()):
        encoded = []
        for i in range(DISTINCT):
            spec = RadiographSpec(transfer_syntax=syntax, bits_stored=12, window=(2048, 4096))
            picture = chest_phantom(size, seed=i, opacity=0.8 * (i % 2))
            pixels = stored_values(picture, spec)
            encoded.append(encode(build_dataset(pixels, spec), pixels, syntax))
        for k in range(per_syntax):
            n = s * per_syntax + k
            ds = encoded[k % DISTINCT]
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.AccessionNumber = f"LC{n:06d}"
            ds.StudyDate = f"2026{1 + n % 6:02d}{1 + n % 28:02d}"
            path = root / name / f"{n:06d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            accessions.append(ds.AccessionNumber)
    return accessions


_OPENAT = re.compile(r'openat\([^,]+, "((?:[^"\\]|\\.)*)"')


def scan(archive: Path, out: Path, trace: Path, *extra: str) -> dict[str, float]:
    """One traced ``batchscan scan``: wall seconds, archive files opened and their bytes,
    and the manifest's counts."""
    command = [
        "strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=openat", "-o", str(trace),
        sys.executable, "-m", "batchscan.cli", "scan", str(archive), "--out", str(out),
        "--no-progress", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"scan failed ({done.returncode}): {done.stderr[-2000:]}")
    root = str(archive.resolve()) + os.sep
    opened = {
        m.group(1)
        for line in trace.read_text(errors="replace").splitlines()
        if "ENOENT" not in line and (m := _OPENAT.search(line)) and m.group(1).startswith(root)
    }
    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest["seconds_by_stage"]
    return {
        "seconds": seconds,
        "work": stages["read_and_score"]
        + stages["rescore"]
        - stages["model_load"]
        - stages["compile"],
        "opened": len(opened),
        "bytes": sum(os.stat(p).st_size for p in opened if os.path.isfile(p)),
        "scored": manifest["images_scored_this_run"],
        "store_bytes_per_image": (manifest.get("input_store") or {}).get("bytes_per_image"),
        "warning": "WARNING: performance" in done.stdout,
        "labelled": (manifest.get("monitoring") or {}).get("reports_labelled_this_run"),
    }


def reports(accessions: list[str], seed: int, changed: float = 0.0) -> list[tuple[str, str]]:
    """A report per study (random labels: this measures cost, not accuracy); with
    `changed`, that share of them rewritten as a later night's export would."""
    rng = np.random.default_rng(seed)
    texts = [DEMO_REPORTS[int(rng.integers(2))][int(rng.integers(3))] for _ in accessions]
    if changed:
        for i in rng.choice(len(texts), int(changed * len(texts)), replace=False):
            texts[i] = texts[i] + "\nADDENDUM: reviewed."
    return list(zip(accessions, texts, strict=True))


def lifecycle(
    archive: Path, accessions: list[str], work: Path, model: Path, workers: int
) -> list[tuple[str, dict[str, float]]]:
    """The six steps on one archive (REPORT_DIRs under `work`)."""
    work.mkdir(parents=True, exist_ok=True)
    trace, ris = work / "trace.txt", work / "ris.csv"
    out, fresh = work / "reports", work / "reread"
    common = ("--workers", str(workers))
    site = ("--model", str(model))
    shadow = (*common, *site, "--shadow-model", str(default_model_path()))
    monitored = (*shadow, "--reports-file", str(ris))
    steps = [
        ("first scan", scan(archive, out, trace, *common)),
        ("re-read (new REPORT_DIR)", scan(archive, fresh, trace, *common, *site)),
        ("model change", scan(archive, out, trace, *common, *site)),
        ("shadow run", scan(archive, out, trace, *shadow)),
    ]
    write_reports(ris, reports(accessions, seed=1))
    steps.append(("first reports", scan(archive, out, trace, *monitored)))
    write_reports(ris, reports(accessions, seed=1, changed=0.10))
    steps.append(("new reports only", scan(archive, out, trace, *monitored)))
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=600)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temp dir)")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        sys.exit("needs strace (Debian: apt-get install strace)")
    work = args.keep or Path(tempfile.mkdtemp(prefix="batchscan-lifecycle-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        archive = work / "archive"
        started = time.perf_counter()
        accessions = write_archive(archive, args.files, args.size)
        written = time.perf_counter() - started
        model = site_model(work / "models")
        # a quarter of the files (hardlinks), for the marginal rates
        small = work / "small"
        every = sorted(archive.rglob("*.dcm"))[::4]
        for path in every:
            target = small / path.relative_to(archive)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
        few = lifecycle(small, accessions[::4], work / "few", model, args.workers)
        steps = lifecycle(archive, accessions, work / "all", model, args.workers)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    def marginal(big: dict[str, float], little: dict[str, float]) -> tuple[float | None, float]:
        """(images/s of the work between the two archives, the work's fixed seconds)."""
        extra = big["scored"] - little["scored"]
        if extra <= 0:
            return None, big["work"]
        rate = extra / max(big["work"] - little["work"], 1e-9)
        return rate, max(big["work"] - big["scored"] / rate, 0.0)

    rates = [marginal(big, little) for (_, big), (_, little) in zip(steps, few, strict=True)]
    base_rate = rates[1][0] or 1.0
    total_bytes = steps[0][1]["bytes"]
    print(
        f"lifecycle benchmark: {args.files} files of {args.size} px, 12-bit, "
        f"{' + '.join(SYNTAXES)} (written in {written:.0f} s, {total_bytes / 1e6:.0f} MB), "
        f"{args.workers} decode workers, {os.cpu_count()} cores; images/s are marginal "
        f"between {len(every)} and {args.files} files"
    )
    print(
        f"{'step':24} {'wall s':>7} {'images':>7} {'images/s':>9} {'x re-read':>9} "
        f"{'fixed s':>8} {'files opened':>12} {'MB read':>8} {'1M images':>10}"
    )
    for (name, r), (rate, fixed) in zip(steps, rates, strict=True):
        # a million images: the work at the marginal rate, plus the fixed cost of the work
        # (loading models, compiling) and of the run (start-up, reports) measured here
        overhead = fixed + r["seconds"] - r["work"]
        million = f"{(1e6 / rate + overhead) / 3600:9.2f}h" if rate else f"{'-':>10}"
        print(
            f"{name:24} {r['seconds']:7.1f} {int(r['scored']):7d} {rate or 0:9.1f} "
            f"{(rate or 0) / base_rate:9.2f} {overhead:8.1f} {int(r['opened']):12d} "
            f"{r['bytes'] / 1e6:8.1f} {million}"
        )
    print(
        f"input store: {steps[-1][1]['store_bytes_per_image']} bytes per image "
        f"(a million images: {(steps[-1][1]['store_bytes_per_image'] or 0) / 1e3:.1f} GB); "
        f"reports labelled: first night {steps[4][1]['labelled']}, next night "
        f"{steps[5][1]['labelled']}; the archive holds {total_bytes / args.files / 1e6:.2f} MB "
        f"an image, {total_bytes / args.files / 1e3:.0f} GB a million (what a re-read reads)"
    )


if __name__ == "__main__":
    main()
