#!/usr/bin/env python3
"""What the drift monitor adds to a nightly run, against reading the same rows from the state
(a baseline measured in the same run), at N stored inputs, extrapolated to a million.

Usage:
    nice -n 10 python jobs/bench/drift_benchmark.py [--inputs 100000] [--per-day 1000]
        [--period day] [--work DIR]

Builds a REPORT_DIR as a scan leaves it: a state of N scored one-image studies, ``--per-day``
a day, and an input store holding each one's 64 x 64 input (pictures of the synthetic
chest phantom, a few hundred distinct ones cycled: the monitor's cost does not depend on
what the pictures show). Then times, with the shipped model making the features:

* the baseline: the state's scored file rows and study rows read into frames, which the
  monitor reads first (``StateStore.scored_file_facts``, ``StateStore.study_facts``);
* the first run of the monitor on that store (it makes the vectors of every period's sample,
  at most ``MAX_NEW_PER_RUN`` of them; the rest wait for the next runs);
* the runs after it until nothing waits, then a night: one more day of studies scanned in,
  and the monitor again.

The night is what a nightly run pays. Extrapolated to a million stored inputs: the reading
(rows) and the judging (periods, at the same studies a day) grow with the archive, ten times
here; making the new night's vectors does not grow (one night's sample); reading the kept
vectors grows with the number of periods. The issue's budget: 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from batchscan.ingest.preprocess import preprocess
from batchscan.ingest.records import SCORED, ImageRecord
from batchscan.results.aggregate import aggregate_studies
from batchscan.results.state import StateStore
from batchscan.scoring.infer import Scorer
from batchscan.scoring.input_store import InputStore
from batchscan.scoring.model import load_model
from batchscan.site import drift
from batchscan.synth import chest_phantom

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up lines
START = pd.Timestamp("2024-01-01")
INPUT_KEY = "bench-input-key"
RUN = "bench"
DISTINCT = 400


def _records(first: int, count: int, per_day: int, rng: np.random.Generator) -> list[ImageRecord]:
    out = []
    for i in range(first, first + count):
        path = f"{i // 10000:03d}/{i:08d}.dcm"
        out.append(
            ImageRecord(
                path=path,
                abs_path=f"/archive/{path}",
                size=5_000_000 + i,
                mtime_ns=1,
                status=SCORED,
                study_instance_uid=f"1.2.826.0.1.{i}",
                sop_instance_uid=f"1.2.826.0.1.{i}.1",
                modality=("CR", "DX")[i % 2],
                view=("PA", "AP")[int(rng.random() < 0.3)],
                rows=2500,
                columns=3000,
                study_date=(START + pd.Timedelta(days=i // per_day)).date().isoformat(),
                manufacturer=("Globex", "Initech")[i % 2],
                manufacturer_model="DR-1",
                patient_age_years=float(rng.uniform(1, 90)),
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                photometric="MONOCHROME2",
                pixel_spacing_mm=(0.1, 0.139)[i % 2],
                score=float(rng.beta(2, 5)),
                ood_score=1.0,
                ood=bool(rng.random() < 0.01),
            )
        )
    return out


def scan_in(root: Path, first: int, count: int, per_day: int, pictures: np.ndarray) -> float:
    """Add `count` scored studies to the state and their inputs to the store, as a scan
    would (one run, so that the files stored before stay); returns the seconds it took
    (not part of what is measured)."""
    started = time.perf_counter()
    rng = np.random.default_rng(first)
    state = StateStore(root / "state.sqlite")
    store = InputStore(root / "inputs.sqlite")
    if not first:
        state.begin_run(RUN, "2024-01-01T00:00:00", "m", "bench")
    records = _records(first, count, per_day, rng)
    state.save(records, RUN, "h.k.d.m.s", "m")
    store.put(
        ((r.path, r.size, r.mtime_ns), INPUT_KEY, pictures[i % len(pictures)])
        for i, r in enumerate(records, start=first)
    )
    state.finish(RUN, partial(aggregate_studies, threshold=0.5, model_version="m"))
    state.close()
    store.close()
    return time.perf_counter() - started


def _read_rows(state: StateStore) -> tuple[float, float]:
    """Wall and CPU seconds of reading the rows the monitor reads."""
    started = time.perf_counter(), time.process_time()
    parts = list(state.scored_file_facts(drift.FILE_COLUMNS))
    pd.DataFrame({c: [v for p in parts for v in p[c]] for c in drift.FILE_COLUMNS})
    study = list(state.study_facts(("study_date", "flag")))
    pd.DataFrame({c: [v for p in study for v in p[c]] for c in ("study_date", "flag")})
    return time.perf_counter() - started[0], time.process_time() - started[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--per-day", type=int, default=1000)
    parser.add_argument("--period", choices=("day", "week", "month"), default="day")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    root = args.work or Path(tempfile.mkdtemp(prefix="batchscan-drift-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    if (root / "state.sqlite").exists():
        raise SystemExit(f"{root} holds a state already: give an empty --work folder")
    pictures = np.stack([preprocess(chest_phantom(256, seed=i)) for i in range(DISTINCT)])
    built = scan_in(root, 0, args.inputs, args.per_day, pictures)
    print(f"built {args.inputs} scored studies and stored inputs in {built:.0f} s ({root})")

    scorer = Scorer(load_model(), batch_size=256)
    scorer.features(pictures[:256])  # compile once, as the scan has by the time it monitors
    state, store = StateStore(root / "state.sqlite"), InputStore(root / "inputs.sqlite")
    monitor = partial(
        drift.monitor_drift,
        period=args.period,
        input_key=INPUT_KEY,
        model_key="shipped",
        features=scorer.features,
    )
    rows: list[tuple[str, tuple[float, float], dict]] = []

    def timed(name: str) -> drift.Drifted:
        started = time.perf_counter(), time.process_time()
        found = monitor(state, store)
        spent = time.perf_counter() - started[0], time.process_time() - started[1]
        rows.append((name, spent, found.facts))
        return found

    try:
        baseline = min(_read_rows(state) for _ in range(2))
        first = timed("monitor, first run")
        runs = 1
        while first.facts["vectors_waiting"]:
            first = monitor(state, store)
            runs += 1
        print(f"the sample's vectors were all made after {runs} runs")
    finally:
        state.close()
        store.close()

    scan_in(root, args.inputs, args.per_day, args.per_day, pictures)
    state, store = StateStore(root / "state.sqlite"), InputStore(root / "inputs.sqlite")
    try:
        night = timed("monitor, a night (one day more)")
        baseline_after = _read_rows(state)
    finally:
        state.close()
        store.close()

    scale = 1_000_000 / (args.inputs + args.per_day)
    print(
        f"\nperiod {args.period}; {args.inputs + args.per_day} stored inputs, "
        f"{args.per_day} a day; CPU seconds of this process (wall seconds in brackets: "
        "the machine may be shared)\n"
    )
    print(
        "| what | seconds | read rows | read kept vectors | make vectors | judge | vectors made |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| baseline: read the same rows from the state | {baseline[1]:.2f} "
        f"({baseline[0]:.2f}) | | | | | |"
    )
    for name, (wall, cpu), facts in rows:
        part, parts_wall = facts["cpu_seconds"], facts["seconds"]
        cells = " | ".join(
            f"{part.get(k, 0):.2f} ({parts_wall.get(k, 0):.2f})"
            for k in ("read", "kept", "make", "judge")
        )
        print(f"| {name} | {cpu:.2f} ({wall:.2f}) | {cells} | {facts['vectors_made']} |")
    part = night.facts["cpu_seconds"]
    grows = part["read"] + part.get("kept", 0.0) + part["judge"]
    extrapolated = scale * grows + part["make"]
    night_cpu = rows[-1][1][1]
    print(
        f"\na night: {night_cpu:.2f} CPU s, {night_cpu / baseline_after[1]:.1f} x reading the "
        f"rows ({baseline_after[1]:.2f} CPU s); at a million stored inputs about "
        f"{extrapolated:.0f} CPU s (reading, kept vectors and judging x {scale:.1f}, making one "
        "night's vectors as measured); budget 60 s on 2 cores"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
