#!/usr/bin/env python3
"""What an SR costs per study (``scan --sr-out``, ``batchscan send``), against baselines
measured in the same run.

    python jobs/bench/sr_benchmark.py [--studies 200] [--size 256] [--repeat 3]

Writes a demo archive of --studies studies (a frontal and a lateral each), scans it once
(the scan's cost per study is the scale the SR stage is judged against), then times, best
of --repeat:

* ``headers``: ``pydicom.dcmread(stop_before_pixels=True)`` of every scored file, what any
  SR writer must read to copy the patient and study modules (the floor);
* ``full constructor``: read the headers and make each SR in memory with highdicom's full
  constructor (``build_sr``, then ``dcmwrite``), for the first --reference studies (it
  costs tens of ms each): how SRs were made before the template, and the reference their
  content is held equal to;
* ``sr first as before``: the SR stage as it was before the template, on those studies:
  the full constructor, each file written to a temporary file, fsynced and renamed on its
  own (two fsyncs a file), the batch recorded in the ledger;
* ``template``: read the headers and make each SR in memory from the run's template
  (``SrTemplate.encode``), what the SR stage does per study;
* ``sr first``: the SR stage on a new outbox (every study new: read the headers, make the
  SR from the template, write the batch atomically with one file-system sync before and one
  after the renames, record it), in this process and with --workers (default: all cores, as
  the scan has it; the worker processes start only once a run has made 4096 SRs in its own,
  so below that this row is the scan's one process);
* ``sr rerun``: the SR stage again with nothing new (derive each UID, look it up);
* ``send``: every SR to a real Orthanc on 127.0.0.1 (when Debian's ``orthanc`` is
  installed), one association, one C-STORE per SR: ``batchscan send`` (each delivery
  recorded) against DCMTK's ``storescu`` (the reference C-STORE client) on the same files.

Ratios are against ``headers`` (and ``storescu``); the share is the cost against the
scan's own cost per study.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pydicom

from batchscan.cli import main as batchscan
from batchscan.engines.pipeline import default_workers
from batchscan.pacs.outbox import Outbox
from batchscan.pacs.send import Destination, send_outbox
from batchscan.pacs.sr import (
    Algorithm,
    StudyResult,
    build_sr,
    content_digest,
    read_evidence,
    sr_file,
    sr_instance_uid,
    study_results,
)
from batchscan.pacs.template import SrTemplate
from batchscan.pacs.write import write_srs
from batchscan.results.state import STATE_FILE, StateStore
from batchscan.storage import files
from batchscan.synth import write_demo_archive

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/, for common/
from common import orthanc


def best(repeat: int, run: Callable[[], object], reset: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if reset is not None:
            reset()
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument(
        "--reference", type=int, default=50,
        help="studies made with highdicom's full constructor (it costs tens of ms each)",
    )  # fmt: skip
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sr-benchmark-"))
    try:
        archive, out, outbox = root / "archive", root / "reports", root / "outbox"
        write_demo_archive(archive, size=args.size, studies=args.studies)
        started = time.perf_counter()
        code = batchscan(["scan", str(archive), "--out", str(out), "--no-progress"])
        scan_seconds = time.perf_counter() - started
        if code != 0:
            raise SystemExit(f"scan failed with status {code}")
        state = StateStore(out / STATE_FILE)
        studies = list(study_results(state.scored_study_images()))
        n = len(studies)
        manifest = json.loads((out / "manifest.json").read_text())
        algorithm = Algorithm(manifest["model"]["version"], manifest["model"]["threshold"])

        def headers() -> None:
            for study in studies:
                for image in study.images:
                    pydicom.dcmread(archive / image.path, stop_before_pixels=True)

        def fresh() -> None:
            shutil.rmtree(outbox, ignore_errors=True)

        rows = [("headers", best(args.repeat, headers), n)]
        analysed_at = datetime.now(UTC)
        reference = studies[: args.reference]

        def full_sr(study: StudyResult, uid: str) -> bytes:
            sr = build_sr(study, read_evidence(archive, study), algorithm, uid, 1, analysed_at)
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
            return buffer.getvalue()

        def full() -> None:
            for study in reference:
                full_sr(study, "2.25.1")

        def before() -> None:
            """The SR stage as it was: highdicom's full constructor, each file written and
            fsynced on its own, the batch recorded in the ledger."""
            with Outbox(outbox, create=True) as ledger:
                recorded = []
                for study in reference:
                    uid = sr_instance_uid(content_digest(study, algorithm))
                    data = full_sr(study, uid)
                    final = sr_file(outbox, study.study_instance_uid, uid)
                    final.parent.mkdir(parents=True, exist_ok=True)
                    files.write(final, data, token="benchmark")
                    recorded.append((uid, study.study_instance_uid, final,
                                     hashlib.sha256(data).hexdigest(), algorithm.model_version,
                                     study.score, 1))  # fmt: skip
                ledger.record_many(recorded)

        name = f"SR in memory, highdicom's full constructor ({len(reference)} studies)"
        rows.append((name, best(args.repeat, full), len(reference)))
        name = f"sr first as before: full constructor, a fsync a file ({len(reference)} studies)"
        rows.append((name, best(args.repeat, before, fresh), len(reference)))
        started = time.perf_counter()
        template = SrTemplate(algorithm, analysed_at)
        built = time.perf_counter() - started

        def from_template() -> None:
            for study in studies:
                template.encode(study, read_evidence(archive, study), "2.25.1", 1)

        rows.append(("SR in memory, the run's template", best(args.repeat, from_template), n))

        def stage(workers: int) -> Callable[[], object]:
            return lambda: write_srs(
                state, archive, outbox, algorithm, "benchmark", workers, analysed_at
            )

        rows.append(("sr first, 1 process", best(args.repeat, stage(0), fresh), n))
        name = f"sr first, --workers {args.workers}"
        rows.append((name, best(args.repeat, stage(args.workers), fresh), n))
        rows.append(("sr rerun", best(args.repeat, stage(args.workers)), n))
        state.close()
        sends = measure_send(root, outbox, n, args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    per_scan = scan_seconds / n
    base = rows[0][1] / n
    print(f"{n} scored studies ({args.size} px images); scan: {per_scan * 1e3:.1f} ms per study; "
          f"template built in {built:.2f} s (once per model, run and process)")  # fmt: skip
    print("| step | seconds | ms per study | studies/s | ratio to headers | share of scan |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, count in rows:
        each = seconds / count
        print(
            f"| {name} | {seconds:.3f} | {each * 1e3:.2f} | {1 / each:,.0f} | "
            f"{each / base:.2f} | {each / per_scan:.1%} |"
        )
    if sends:
        print()
        print("| sender (one association, every SR, Orthanc on 127.0.0.1) | seconds | ms per SR "
              "| SRs/s | ratio to storescu |")  # fmt: skip
        print("|---|---:|---:|---:|---:|")
        reference = sends.get("storescu (DCMTK)")
        for name, seconds in sends.items():
            ratio = f"{seconds / reference:.2f}" if reference else "-"
            print(f"| {name} | {seconds:.3f} | {seconds / n * 1e3:.1f} | {n / seconds:,.1f} | "
                  f"{ratio} |")  # fmt: skip


def measure_send(root: Path, outbox: Path, n: int, repeat: int) -> dict[str, float]:
    """Best-of-`repeat` seconds to send every SR: DCMTK's storescu (the reference C-STORE
    client, one association for all files) and ``batchscan send`` (which also records each
    delivery); the ledger is put back after each send, so that every SR is due again."""
    if problem := orthanc.orthanc_missing():
        print(f"send not measured: {problem}")
        return {}
    files = sorted(str(p) for p in outbox.glob("*/*.dcm"))
    ledger, backup = outbox / "outbox.sqlite", root / "ledger.sqlite"
    shutil.copy(ledger, backup)
    times: dict[str, float] = {}
    with orthanc.Orthanc(root / "orthanc") as pacs:
        destination = Destination.parse(pacs.destination)
        storescu = shutil.which("storescu")
        if storescu is not None:
            command = [storescu, "-aec", destination.ae_title, destination.host,
                       str(destination.port), *files]  # fmt: skip
            times["storescu (DCMTK)"] = best(
                repeat, lambda: subprocess.run(command, check=True, capture_output=True)
            )

        def send() -> None:
            outcome = send_outbox(outbox, destination)
            assert outcome.sent == n, outcome

        def restore() -> None:
            for extra in ("-wal", "-shm"):
                Path(f"{ledger}{extra}").unlink(missing_ok=True)
            shutil.copy(backup, ledger)

        times["batchscan send"] = best(repeat, send, restore)
    return times


if __name__ == "__main__":
    main()
