"""The local engine: discovery -> worker processes -> batched inference -> reports.

Shape of a run::

    iter_files (main, streaming) -> files unchanged since the last run are left out
      (the incremental state, :mod:`batchscan.results.state`, done by the caller)
      -> tasks of records -> WorkerPool (forkserver; crash/timeout isolation per file)
         running prepare_record: header -> decode + normalize -> preprocess
         (no TensorFlow in workers)
      -> at most 2 tasks per worker in flight (memory bounded; decoding overlaps inference)
      -> InferenceBuffer: model inputs gathered to --batch-size, scored in one call
      -> finished records go to a sink (the state, committed in checkpoints)
      -> at the end (caller): aggregate touched studies, write reports from the state.

:func:`prepare_batch` and :func:`score_prepared` are functions over batches of records,
the shape a distributed engine (Ray Data ``map_batches``) runs as well.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from itertools import chain
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, Final

import numpy as np

from batchscan import __version__, versions
from batchscan.engines.workers import (
    DEFAULT_FILE_TIMEOUT,
    PreparedBatch,
    PrepareRecord,
    WorkerPool,
    run_task,
)
from batchscan.ingest import paths
from batchscan.ingest.decoders import DEFAULT_MIN_EDGE
from batchscan.ingest.dicom import DisplayImage, decode_record
from batchscan.ingest.domain import Domain, judge
from batchscan.ingest.header import DEFAULT_MAX_PIXEL_BYTES, StageOptions, read_header
from batchscan.ingest.preprocess import preprocess
from batchscan.ingest.records import FAILED, SCORED, SKIPPED, ImageRecord, Scores, chunks
from batchscan.ingest.sanity import passes
from batchscan.ingest.sources import PACS_UNAVAILABLE, PacsArchive, PacsUnavailableError

log = logging.getLogger("batchscan")


#: glibc malloc settings for the decode processes. By default glibc gives a freed multi-MB
#: buffer back to the kernel, so every file's pixel buffers are page-faulted in afresh: a
#: 2048 x 2048 file cost ~3,500 minor faults and 10 ms instead of 4 in a worker (measured).
#: Keeping buffers up to 32 MiB on the heap, and up to 128 MiB of free heap untrimmed, makes
#: workers reuse their memory (bounded: 128 MiB per worker at most is kept idle).
WORKER_MALLOC: Final = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(128 * 1024 * 1024),
}
#: One BLAS thread per decode process: there is one process per core already, and numpy's
#: OpenBLAS threads, spinning on the other workers' cores, made two workers slower than one
#: on JPEG 2000 bands (their small matrix products, :mod:`batchscan.ingest.sampling`; measured 12.0
#: s against 8.6 s for the same 308 files). Read when a process loads numpy: the forkserver's.
WORKER_THREADS: Final = {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def worker_context() -> BaseContext:
    """The multiprocessing context decode processes start from: ``forkserver`` (the main
    process holds TensorFlow, which must not be forked), with the stages preloaded and
    :data:`WORKER_MALLOC` and :data:`WORKER_THREADS` in the environment, where glibc and
    numpy read them when the server starts (this process's numpy is loaded already)."""
    for name, value in (WORKER_MALLOC | WORKER_THREADS).items():
        os.environ.setdefault(name, value)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["batchscan.engines.pipeline"])
    return context


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
    archive:
        The archive folder, or a PACS (:class:`~batchscan.ingest.sources.PacsArchive`):
        its instances are found by query and fetched by the decode workers
        (:mod:`batchscan.engines.fetch`).
    workers:
        Decode processes; 0 decodes in the main process (debugging, tiny archives). A PACS
        scan runs at most ``pacs_connections`` of them (:attr:`decode_processes`).
    files_per_task:
        Files sent to a worker at once: large enough to amortise inter-process overhead,
        small enough to keep every worker busy to the end.
    file_timeout:
        Seconds a worker may spend on one file before it is killed (``failed: timeout``).
    min_edge:
        Decode images only down to this short edge (see :mod:`batchscan.ingest.decoders`); None
        decodes at full resolution.
    prepare:
        The per-record stages run in the workers (default :func:`prepare_record`; for a
        PACS, :class:`~batchscan.engines.fetch.FetchingPrepare`).
    state:
        The incremental state database (default ``REPORT_DIR/state.sqlite``).
    blank_gate:
        Skip blank pictures (:mod:`batchscan.ingest.sanity`; on by default, the same rule for
        every model).
    domain:
        The model card's training domain (set from the card by the scan).
    out_of_domain:
        ``score`` (default: out-of-domain images are scored and marked) or ``skip``.
    pseudonym_key:
        Key of the ``patient_key`` HMAC, or None for no patient key at all.
    checkpoint_seconds:
        Seconds between commits of finished records to the state.
    engine:
        ``local`` (this machine) or ``ray`` (:mod:`batchscan.engines.ray_engine`).
    ray_address:
        The Ray cluster to join; None starts a local Ray instance for the run.
    sr_out:
        The SR outbox (:mod:`batchscan.pacs`): one DICOM SR per scored study is written
        there; None writes none.
    shadow_model:
        A second model scored on the same inputs beside the one in use (its scores are
        reported as ``shadow_score``, never as the score); None for none.
    reports_file:
        The site's RIS export (a file, or a folder of them) to monitor the model against
        (:mod:`batchscan.site.monitoring`); None for no monitoring.
    monitor_period:
        ``day``, ``week`` (ISO, from Monday) or ``month``: the periods of
        ``performance.parquet`` and ``drift.parquet``.
    drift_reference:
        The studies dated (FROM, TO) as the reference of the drift monitor
        (:mod:`batchscan.site.drift`) and the disagreement alarm; None for the first periods.
    """

    archive: Path | PacsArchive
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
    file_timeout: float = DEFAULT_FILE_TIMEOUT
    min_edge: int | None = DEFAULT_MIN_EDGE
    prepare: PrepareRecord = field(default=None, repr=False)  # type: ignore[assignment]
    state: Path | None = None
    pseudonym_key: bytes | None = field(default=None, repr=False)
    checkpoint_seconds: float = 30.0
    engine: str = "local"
    ray_address: str | None = None
    blank_gate: bool = True
    domain: Domain | None = None
    out_of_domain: str = "score"
    sr_out: Path | None = None
    shadow_model: Path | None = None
    reports_file: Path | None = None
    monitor_period: str = "month"
    drift_reference: tuple[date, date] | None = None

    def __post_init__(self) -> None:
        if self.prepare is None:  # the real stages; tests inject faulty ones
            object.__setattr__(self, "prepare", self._stages())

    def _stages(self) -> PrepareRecord:
        if not isinstance(self.archive, PacsArchive):
            return prepare_record
        from batchscan.engines.fetch import FetchingPrepare

        return FetchingPrepare(self.archive.url, self.archive.source_options(self.all_modalities))

    @property
    def pacs(self) -> PacsArchive | None:
        """The PACS this scan reads, or None for a folder."""
        return self.archive if isinstance(self.archive, PacsArchive) else None

    @property
    def decode_processes(self) -> int:
        """The decode processes of the run: ``workers``, and for a PACS at most one per
        connection (each holds one)."""
        pacs = self.pacs
        return self.workers if pacs is None else min(self.workers, pacs.pacs_connections)

    @property
    def worker_timeout(self) -> float:
        """Seconds one record may take in a decode process: ``file_timeout``, and for a
        PACS the longest a fetch may take besides (so that a hung PACS is told apart from
        a hung codec, and its instances are tried again by the next run)."""
        pacs = self.pacs
        return self.file_timeout + (0.0 if pacs is None else pacs.fetch_seconds())

    @property
    def stage_options(self) -> StageOptions:
        """The options the per-file stages see."""
        return StageOptions(
            all_modalities=self.all_modalities,
            max_pixel_bytes=self.max_pixel_bytes,
            min_edge=self.min_edge,
            pseudonym_key=self.pseudonym_key,
            blank_gate=self.blank_gate,
            domain=self.domain,
            skip_out_of_domain=self.out_of_domain == "skip",
        )


def _stable(record: ImageRecord) -> bool:
    """False (and the record skipped as ``unstable``) if the file vanished or changed since
    it was listed: the archive may still be writing it; the next run will try again."""
    try:
        info = paths.stat(record.abs_path)
    except FileNotFoundError:
        record.skip("unstable", "file vanished after it was listed")
        return False
    except OSError:
        return True  # the header stage records why it cannot be read
    if record.size >= 0 and (info.st_size, info.st_mtime_ns) != (record.size, record.mtime_ns):
        record.skip("unstable", "file changed after it was listed (still being written?)")
        return False
    return True


def prepare_record(record: ImageRecord, options: StageOptions) -> np.ndarray | None:
    """Header -> domain -> decode + normalize -> preprocess -> sanity gate for one record
    (runs in a worker).

    Returns the model input, or None when the record was skipped or failed on the way.
    """
    prepared = prepare_display(record, options)
    return None if prepared is None else prepared[1]


def prepare_display(
    record: ImageRecord, options: StageOptions, content: bytes | None = None
) -> tuple[DisplayImage, np.ndarray] | None:
    """:func:`prepare_record`, also returning the display picture the model input was made
    from (for the pictures people look at: the same stages, not a second route).

    `content` is the file's bytes when they were fetched (an instance from a PACS): the
    same stages read them as they read a file, and fetched bytes cannot change while they
    are read, so the file-stability checks are left out."""
    fetched = content is not None
    if not record.pending or not (fetched or _stable(record)):
        return None
    read_header(record, options, content)
    judge(record, options.domain, options.skip_out_of_domain)
    image = decode_record(record, options, content)
    if image is None:
        return None
    try:
        tensor = preprocess(image.pixels, image.sampling)
    except Exception as exc:  # e.g. a degenerate 1 x N image
        record.fail(f"preprocess_error:{type(exc).__name__}", str(exc))
        return None
    if not fetched and not _stable(record):  # rewritten while we read it: a mix of pixels
        return None
    if options.blank_gate and not passes(record, tensor):  # constant or noise only
        return None
    return image, tensor


def model_input(
    path: str | Path, options: StageOptions, content: bytes | None = None
) -> np.ndarray:
    """The model input the scan job makes of one file (for jobs and tests), or of its
    fetched `content` (a PACS's instance; `path` then only names it).

    Raises
    ------
    ValueError
        If the file is skipped or fails, with its reason.
    """
    return display_and_input(path, options, content)[1]


def display_and_input(
    path: str | Path, options: StageOptions, content: bytes | None = None
) -> tuple[DisplayImage, np.ndarray]:
    """The display picture and the model input the scan job makes of one file, or of its
    fetched `content` (a PACS's instance; `path` then only names it).

    Raises
    ------
    ValueError
        If the file is skipped or fails, with its reason.
    """
    if content is None:
        info = os.stat(path)
        record = ImageRecord(
            path=str(path), abs_path=str(path), size=info.st_size, mtime_ns=info.st_mtime_ns
        )
    else:
        record = ImageRecord(path=str(path), abs_path=str(path), size=len(content))
    prepared = prepare_display(record, options, content)
    if prepared is None:
        raise ValueError(f"{path}: {record.status} {record.reason}")
    return prepared


def prepare_batch(records: list[ImageRecord], options: StageOptions) -> PreparedBatch:
    """:func:`prepare_record` over a batch of records, model inputs stacked."""
    return run_task(records, options, prepare_record)


#: Where finished records go: the records, and the model inputs of those scored, by their
#: position in the list (the scan stores both: :mod:`batchscan.results.state`,
#: :mod:`batchscan.scoring.input_store`).
Sink = Callable[[list[ImageRecord], dict[int, np.ndarray]], None]


def score_prepared(
    batches: list[PreparedBatch], score: Callable[[np.ndarray], Scores]
) -> tuple[list[ImageRecord], dict[int, np.ndarray]]:
    """Score the inputs of several prepared batches in one call; returns all their records
    and the inputs of those scored, by position in that list."""
    records: list[ImageRecord] = []
    by_position: dict[int, np.ndarray] = {}
    for batch in batches:
        for k, position in enumerate(batch.index):
            by_position[len(records) + int(position)] = batch.inputs[k]
        records += batch.records
    inputs = [b.inputs for b in batches if len(b.inputs)]
    if inputs:
        scores = score(np.concatenate(inputs))
        for offset, position in enumerate(by_position):
            scores.apply(records[position], offset)
    return records, by_position


class InferenceBuffer:
    """Gathers prepared batches until `batch_size` inputs are waiting, then scores them."""

    def __init__(
        self,
        score: Callable[[np.ndarray], Scores],
        batch_size: int,
        sink: Sink,
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
            self._sink(*score_prepared(self._batches, self._score))
        self._batches, self._waiting = [], 0


@dataclass(slots=True)
class RunStats:
    """Counts kept while the run streams (the manifest and progress lines come from it)."""

    found: int = 0
    done: int = 0
    reused: int = 0
    rescored: int = 0
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


def prepared_stream(
    config: ScanConfig, records: Iterator[ImageRecord], on_found: Callable[[int], None]
) -> Iterator[PreparedBatch]:
    """Prepared batches as workers finish them, with a bounded number of chunks in flight
    (what scoring and ``batchscan train`` both consume: the same stages, the same pool)."""
    options = config.stage_options

    def counted() -> Iterator[list[ImageRecord]]:
        for chunk in chunks(records, config.files_per_task):
            on_found(len(chunk))
            yield chunk

    tasks = counted()
    first = next(tasks, None)
    if first is None:  # nothing new in the archive: no worker is started
        return
    tasks = chain([first], tasks)
    if config.decode_processes == 0:
        for chunk in tasks:
            yield run_task(chunk, options, config.prepare)
        return
    with WorkerPool(
        worker_context(),
        config.decode_processes,
        options,
        config.prepare,
        file_timeout=config.worker_timeout,
    ) as pool:
        yield from pool.run(tasks)


def run_local(
    config: ScanConfig,
    records: Iterable[ImageRecord],
    score: Callable[[np.ndarray], Scores],
    sink: Sink,
    progress: Callable[[RunStats], None] | None = None,
    stats: RunStats | None = None,
) -> RunStats:
    """Run `records` (a stream from discovery) through the stages and `score`; finished
    records and their model inputs go to `sink` (in completion order). Returns the
    counts; checks the accounting invariant.

    Raises
    ------
    RuntimeError
        If scored + skipped + failed != records in (a bug: a record was lost).
    batchscan.ingest.sources.PacsUnavailableError
        A worker found the PACS gone: what came back before is scored and handed on, the
        rest is left to the next run.
    """
    stats = stats if stats is not None else RunStats()

    def finished(records: list[ImageRecord], inputs: dict[int, np.ndarray]) -> None:
        stats.count(records)
        sink(records, inputs)
        if progress is not None:
            progress(stats)

    def found(n: int) -> None:
        stats.found += n

    buffer = InferenceBuffer(score, config.batch_size, finished)
    for prepared in prepared_stream(config, iter(records), found):
        prepared, lost = without_lost(prepared)
        buffer.add(prepared)
        if lost is not None:
            buffer.flush()
            raise PacsUnavailableError(lost)
    buffer.flush()
    check_accounting(stats)
    return stats


def without_lost(batch: PreparedBatch) -> tuple[PreparedBatch, str | None]:
    """`batch` without the records a PACS scan's worker could not fetch because the PACS
    went away (:func:`batchscan.engines.fetch.lost_pacs`), and why; a folder scan's batches
    as they are."""
    if not any(r.reason == PACS_UNAVAILABLE for r in batch.records):
        return batch, None
    from batchscan.engines.fetch import lost_pacs

    return lost_pacs(batch)


def check_accounting(stats: RunStats) -> None:
    """Every record that went in came out decided, exactly once.

    Raises
    ------
    RuntimeError
        If scored + skipped + failed != records in (a bug: a record was lost).
    """
    decided = stats.by_status[SCORED] + stats.by_status[SKIPPED] + stats.by_status[FAILED]
    if decided != stats.found or stats.done != stats.found:
        raise RuntimeError(
            f"accounting error: {stats.found} files found but {decided} decided "
            f"({dict(stats.by_status)})"
        )


def _plain(value: Any) -> Any:
    """An argument as JSON holds it: paths and dates as text."""
    return str(value) if isinstance(value, Path | date) else value


def new_run_id() -> str:
    """Sortable, unique run id: UTC time plus a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def manifest_for(
    config: ScanConfig,
    stats: RunStats,
    totals: tuple[int, Counter[str], Counter[str]],
    run_id: str,
    started_at: str,
    model: dict[str, Any],
    engine: dict[str, Any],
) -> dict[str, Any]:
    """The run manifest: what ran, on what, with which outcome.

    `totals` (files, counts by status, counts by reason) describe the reports, i.e. the whole
    archive; `stats` the work this run did (files processed, reused from the state).
    """
    seconds = stats.seconds
    scored = stats.by_status[SCORED] + stats.rescored
    files, by_status, by_reason = totals
    arguments = {
        k: _plain(v)
        for k, v in asdict(config).items()
        if k not in ("prepare", "pseudonym_key", "domain")  # the domain is the card's
    }
    arguments["pseudonym_key"] = "set" if config.pseudonym_key is not None else None
    if config.drift_reference is not None:  # as it is given: FROM..TO
        arguments["drift_reference"] = "..".join(d.isoformat() for d in config.drift_reference)
    if config.pacs is not None:  # the PACS by its URL (never with credentials), its options
        arguments["archive"] = config.pacs.name
        arguments["pacs"] = {k: _plain(v) for k, v in asdict(config.pacs).items() if k != "url"}
    return {
        "run_id": run_id,
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "arguments": arguments,
        "files_found": files,
        "files_processed": stats.found,
        "files_reused": stats.reused,
        "counts_by_status": {s: by_status[s] for s in (SCORED, SKIPPED, FAILED)},
        "counts_by_reason": dict(sorted(by_reason.items())),
        "images_scored_this_run": scored,
        "images_per_second": round(scored / seconds, 2) if seconds > 0 else None,
        "files_per_second": round((stats.found + stats.reused) / seconds, 2)
        if seconds > 0
        else None,
        "model": model,
        "engine": engine,
        "code_version": __version__,
        "versions": versions(),  # of Python and the packages behind the scores
    }
