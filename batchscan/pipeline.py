"""The local engine: discovery -> worker processes -> batched inference -> reports.

Shape of a run::

    iter_files (main, streaming)
      -> chunks of records -> ProcessPool (forkserver) running prepare_batch:
             header -> decode + normalize -> preprocess          (no TensorFlow in workers)
      -> bounded number of chunks in flight (memory bounded, decoding overlaps inference)
      -> InferenceBuffer: model inputs gathered to --batch-size, scored in one call
      -> ImagesWriter streams rows to a temporary images.parquet
      -> at the end: aggregate studies, write studies.parquet/csv + manifest, publish all.

:func:`prepare_batch` and :func:`score_prepared` are pure functions over batches of
records, the shape a distributed engine (Ray Data ``map_batches``) runs as well.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from batchscan import __version__
from batchscan.dicom import decode_record
from batchscan.discover import iter_files
from batchscan.header import DEFAULT_MAX_PIXEL_BYTES, StageOptions, read_header
from batchscan.preprocess import CHANNELS, INPUT_SIZE, preprocess
from batchscan.records import FAILED, SCORED, SKIPPED, ImageRecord

log = logging.getLogger("batchscan")


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class ScanConfig:
    """Everything a scan run needs (the CLI fills it; tests build it directly).

    Attributes
    ----------
    workers:
        Decode processes; 0 decodes in the main process (debugging, tiny archives).
    files_per_task:
        Files sent to a worker at once: large enough to amortise inter-process overhead,
        small enough to keep every worker busy to the end.
    """

    archive: Path
    out: Path
    model_path: Path | None = None
    batch_size: int = 256
    workers: int = field(default_factory=default_workers)
    all_modalities: bool = False
    max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES
    progress: bool = False
    files_per_task: int = 16
    jit_compile: bool = True
    precision: str = "auto"

    @property
    def stage_options(self) -> StageOptions:
        """The options the per-file stages see."""
        return StageOptions(
            all_modalities=self.all_modalities, max_pixel_bytes=self.max_pixel_bytes
        )


@dataclass(slots=True)
class PreparedBatch:
    """The result of the per-file stages for one chunk of records.

    ``inputs[k]`` is the model input of ``records[index[k]]``; every other record is
    already ``skipped`` or ``failed``.
    """

    records: list[ImageRecord]
    inputs: np.ndarray
    index: np.ndarray


def prepare_batch(records: list[ImageRecord], options: StageOptions) -> PreparedBatch:
    """Header -> decode + normalize -> preprocess for a chunk of records (runs in a worker)."""
    inputs: list[np.ndarray] = []
    index: list[int] = []
    for i, record in enumerate(records):
        read_header(record, options)
        image = decode_record(record, options)
        if image is None:
            continue
        try:
            inputs.append(preprocess(image.pixels))
        except Exception as exc:  # e.g. a degenerate 1 x N image
            record.fail(f"preprocess_error:{type(exc).__name__}", str(exc))
            continue
        index.append(i)
    stacked = (
        np.stack(inputs)
        if inputs
        else np.empty((0, INPUT_SIZE, INPUT_SIZE, CHANNELS), dtype=np.float32)
    )
    return PreparedBatch(records=records, inputs=stacked, index=np.asarray(index, dtype=np.int64))


def score_prepared(
    batches: list[PreparedBatch], score: Callable[[np.ndarray], np.ndarray]
) -> list[ImageRecord]:
    """Score the inputs of several prepared batches in one call; returns all their records."""
    inputs = [b.inputs for b in batches if len(b.inputs)]
    if inputs:
        scores = score(np.concatenate(inputs))
        offset = 0
        for batch in batches:
            for position in batch.index:
                record = batch.records[int(position)]
                record.status, record.reason, record.score = SCORED, None, float(scores[offset])
                offset += 1
    return [record for batch in batches for record in batch.records]


def chunks(records: Iterable[ImageRecord], size: int) -> Iterator[list[ImageRecord]]:
    """Consecutive lists of `size` records from a stream (the last may be shorter)."""
    iterator = iter(records)
    while chunk := list(islice(iterator, size)):
        yield chunk


class InferenceBuffer:
    """Gathers prepared batches until `batch_size` inputs are waiting, then scores them."""

    def __init__(
        self,
        score: Callable[[np.ndarray], np.ndarray],
        batch_size: int,
        sink: Callable[[list[ImageRecord]], None],
    ) -> None:
        self._score, self._batch_size, self._sink = score, batch_size, sink
        self._batches: list[PreparedBatch] = []
        self._waiting = 0

    def add(self, batch: PreparedBatch) -> None:
        """Queue a prepared batch; score when a full device batch is waiting."""
        self._batches.append(batch)
        self._waiting += len(batch.inputs)
        if self._waiting >= self._batch_size:
            self.flush()

    def flush(self) -> None:
        """Score whatever is waiting and hand the records on."""
        if self._batches:
            self._sink(score_prepared(self._batches, self._score))
        self._batches, self._waiting = [], 0


@dataclass(slots=True)
class RunStats:
    """Counts kept while the run streams (the manifest and progress lines come from it)."""

    found: int = 0
    done: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.perf_counter)

    def count(self, records: list[ImageRecord]) -> None:
        """Account finished records."""
        self.done += len(records)
        for record in records:
            self.by_status[record.status] += 1
            if record.reason:
                self.by_reason[record.reason] += 1

    @property
    def seconds(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.started


def _prepared_stream(
    config: ScanConfig, records: Iterator[ImageRecord], on_found: Callable[[int], None]
) -> Iterator[PreparedBatch]:
    """Prepared batches as workers finish them, with a bounded number of chunks in flight."""
    options = config.stage_options

    def counted() -> Iterator[list[ImageRecord]]:
        for chunk in chunks(records, config.files_per_task):
            on_found(len(chunk))
            yield chunk

    if config.workers == 0:
        for chunk in counted():
            yield prepare_batch(chunk, options)
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["batchscan.pipeline"])
    max_in_flight = 4 * config.workers
    with ProcessPoolExecutor(max_workers=config.workers, mp_context=context) as pool:
        in_flight: set[Future[PreparedBatch]] = set()
        for chunk in counted():
            in_flight.add(pool.submit(prepare_batch, chunk, options))
            if len(in_flight) >= max_in_flight:
                finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
        while in_flight:
            finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                yield future.result()


def run_local(
    config: ScanConfig,
    score: Callable[[np.ndarray], np.ndarray],
    sink: Callable[[list[ImageRecord]], None],
    progress: Callable[[RunStats], None] | None = None,
) -> RunStats:
    """Run every file of the archive through the stages and `score`; finished records go to
    `sink` (in completion order). Returns the counts; checks the accounting invariant.

    Raises
    ------
    RuntimeError
        If scored + skipped + failed != files found (a bug: a record was lost).
    """
    stats = RunStats()

    def finished(records: list[ImageRecord]) -> None:
        stats.count(records)
        sink(records)
        if progress is not None:
            progress(stats)

    def found(n: int) -> None:
        stats.found += n

    buffer = InferenceBuffer(score, config.batch_size, finished)
    for prepared in _prepared_stream(config, iter_files(config.archive), found):
        buffer.add(prepared)
    buffer.flush()
    decided = stats.by_status[SCORED] + stats.by_status[SKIPPED] + stats.by_status[FAILED]
    if decided != stats.found or stats.done != stats.found:
        raise RuntimeError(
            f"accounting error: {stats.found} files found but {decided} decided "
            f"({dict(stats.by_status)})"
        )
    return stats


def new_run_id() -> str:
    """Sortable, unique run id: UTC time plus a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def manifest_for(
    config: ScanConfig,
    stats: RunStats,
    run_id: str,
    started_at: str,
    model: dict[str, Any],
    engine: dict[str, Any],
) -> dict[str, Any]:
    """The run manifest: what ran, on what, with which outcome."""
    seconds = stats.seconds
    scored = stats.by_status[SCORED]
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    return {
        "run_id": run_id,
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "arguments": arguments,
        "files_found": stats.found,
        "counts_by_status": {s: stats.by_status[s] for s in (SCORED, SKIPPED, FAILED)},
        "counts_by_reason": dict(sorted(stats.by_reason.items())),
        "images_per_second": round(scored / seconds, 2) if seconds > 0 else None,
        "files_per_second": round(stats.found / seconds, 2) if seconds > 0 else None,
        "model": model,
        "engine": engine,
        "code_version": __version__,
    }
