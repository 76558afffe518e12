"""Hypothesis fuzzing: mutated real DICOM bytes through header, decode and preprocess.

Every mutated file must come out of the per-file stages with a status and a reason: no
unhandled exception (``internal_error``), no worker dying from a Python error, no hang. The
files run in an isolated worker, so a C codec that segfaults costs one example, as in a
real run, and cannot take the test process down. Derandomized: the same examples every run.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchscan.engines.pipeline import prepare_record, worker_context
from batchscan.engines.workers import WorkerPool
from batchscan.ingest.header import StageOptions
from batchscan.ingest.records import ImageRecord
from tests.fuzz import mutations

SEEDS = mutations.seed_files()
OPTIONS = StageOptions(all_modalities=True, max_pixel_bytes=64 * 1024 * 1024, min_edge=None)
#: The seeds are 48 px: a 12 px minimum edge sends them through the reduced-resolution
#: decoders (Pillow's JPEG 2000 reduce and JPEG draft) as a 2048 px radiograph would be.
REDUCED = dataclasses.replace(OPTIONS, min_edge=12)
SEEN: Counter[str] = Counter()


@pytest.fixture(scope="module")
def pool() -> Iterator[list[WorkerPool]]:
    """One isolated decode process decoding at full resolution, one decoding reduced."""
    context = worker_context()
    with (
        WorkerPool(context, 1, OPTIONS, prepare_record, file_timeout=20.0) as full,
        WorkerPool(context, 1, REDUCED, prepare_record, file_timeout=20.0) as reduced,
    ):
        yield [full, reduced]


fractions = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
mutation = st.one_of(
    st.tuples(st.just("truncate"), fractions),
    st.tuples(
        st.just("flip"),
        st.lists(fractions, min_size=1, max_size=12),
        st.lists(st.integers(0, 255), min_size=1, max_size=12),
    ),
    st.tuples(
        st.just("absurd"),
        st.integers(0, 6),
        st.sampled_from([0, 1, 2, 7, 9, 17, 33, 255, 0x7FFF, 0x8000, 0xFFFF]),
    ),
    st.tuples(st.just("vr"), fractions, st.integers(0, 9)),
    st.tuples(
        st.just("encapsulation"),
        fractions,
        st.sampled_from([0, 1, 3, 7, 0xFFFFFFFF, 0x7FFFFFFF, 100_000_000]),
    ),
)


def _apply(data: bytes, change: tuple) -> bytes:
    kind, *args = change
    return {
        "truncate": mutations.truncate,
        "flip": mutations.flip,
        "absurd": mutations.absurd_value,
        "vr": mutations.wrong_vr,
        "encapsulation": mutations.break_encapsulation,
    }[kind](data, *args)


@settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(seed=st.integers(0, len(SEEDS) - 1), changes=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_files_always_get_a_reason(
    pool: list[WorkerPool], seed: int, changes: list
) -> None:
    data = SEEDS[seed]
    for change in changes:
        data = _apply(data, change)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mutant.dcm"
        path.write_bytes(data)
        info = path.stat()
        done = []
        for workers in pool:
            record = ImageRecord(
                path="mutant.dcm", abs_path=str(path), size=info.st_size, mtime_ns=info.st_mtime_ns
            )
            done += [r for b in workers.run([[record]]) for r in b.records]
    for record in done:
        _check(record, changes)


def _check(done: ImageRecord, changes: list) -> None:
    assert done.status in {"pending", "skipped", "failed"}  # pending = decoded and scorable
    SEEN[done.reason or "decoded"] += 1
    assert not (done.reason or "").startswith("internal_error"), done
    assert done.reason != "timeout", f"a mutated file hung the decoder: {changes}"
    if done.reason == "worker_crash":
        assert "SIG" in (done.detail or ""), f"a Python error killed the worker: {done}"
