"""Isolated decode workers: a crashing or hanging codec costs one file, never the run.

The C decoders under pydicom (OpenJPEG, libjpeg, CharLS) can segfault or loop forever on a
broken file, and the OOM killer can take a worker. ``concurrent.futures`` gives up the whole
pool when one worker dies, so batchscan runs its own small pool:

* every worker has its own pipe; before each file it sends ``("start", task, i)``, so the
  main process always knows which file each worker is on and since when;
* a worker whose process ends (its sentinel fires) or that spends longer than
  ``file_timeout`` on one file is killed and replaced; that file is recorded ``failed`` with
  ``worker_crash`` (and the signal) or ``timeout``; the files of its tasks that were not
  reported yet are queued again, so nothing is lost and nothing is scored twice;
* each worker holds at most ``depth`` tasks, which bounds memory and keeps workers decoding
  while the main process runs inference.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import connection
from multiprocessing.context import BaseContext
from typing import Any, Final

import numpy as np

from batchscan.ingest.header import StageOptions
from batchscan.ingest.preprocess import CHANNELS, INPUT_SIZE
from batchscan.ingest.records import INTERPRETER_EXITS, ImageRecord

#: Function of one record run in the workers: the model input, or None (record decided).
PrepareRecord = Callable[[ImageRecord, StageOptions], np.ndarray | None]

#: Default seconds one file may take in a worker before it is killed.
DEFAULT_FILE_TIMEOUT: Final = 120.0
#: Files a worker decodes before it is replaced by a fresh process, so that memory a codec
#: leaks (or fragments) over millions of files is given back; a restart costs ~0.1 s.
DEFAULT_RECYCLE_AFTER: Final = 10_000
#: The reasons the pool fails a file with itself: the decode process died on it (a codec's
#: crash; tried again next run) or gave no result within the file timeout (not tried again).
WORKER_CRASH: Final = "worker_crash"
TIMEOUT: Final = "timeout"
#: Times a task may lose its worker before any file started (then all its files fail).
_MAX_SILENT_CRASHES: Final = 2


@dataclass(slots=True)
class PreparedBatch:
    """The result of the per-file stages for one task of records.

    ``inputs[k]`` is the model input of ``records[index[k]]``; every other record is
    already ``skipped`` or ``failed``.
    """

    records: list[ImageRecord]
    inputs: np.ndarray
    index: np.ndarray


def empty_inputs() -> np.ndarray:
    """A (0, 64, 64, 3) float32 array."""
    return np.empty((0, INPUT_SIZE, INPUT_SIZE, CHANNELS), dtype=np.float32)


def run_task(
    records: list[ImageRecord],
    options: StageOptions,
    prepare: PrepareRecord,
    on_start: Callable[[int], None] | None = None,
) -> PreparedBatch:
    """Run `prepare` over a task's records and stack the model inputs. A `prepare` with a
    ``begin_task`` method is told the task's records first (a PACS scan's fetches start
    ahead of the decoding: :mod:`batchscan.engines.fetch`)."""
    inputs: list[np.ndarray] = []
    index: list[int] = []
    begin = getattr(prepare, "begin_task", None)
    if begin is not None:
        begin(records)
    for i, record in enumerate(records):
        if on_start is not None:
            on_start(i)
        try:
            tensor = prepare(record, options)
        except INTERPRETER_EXITS:
            raise
        except BaseException as exc:  # a bug in a stage: record it, keep the worker and run
            record.fail(f"internal_error:{type(exc).__name__}", str(exc))
            tensor = None
        if tensor is not None:
            inputs.append(tensor)
            index.append(i)
    stacked = np.stack(inputs) if inputs else empty_inputs()
    return PreparedBatch(records=records, inputs=stacked, index=np.asarray(index, np.int64))


def _worker_main(
    conn: connection.Connection, options: StageOptions, prepare: PrepareRecord
) -> None:
    """Body of a worker process: receive tasks, announce each file, send the batch back.

    The C and Rust codecs print to file descriptor 2 on broken files (OpenJPEG's errors, a
    panic message); from cron that would mail one line per broken file of the archive. The
    record already says what went wrong, so the worker's fd 2 goes to /dev/null unless
    BATCHSCAN_WORKER_STDERR is set.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    if not os.environ.get("BATCHSCAN_WORKER_STDERR"):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return
            if message is None:
                return
            task_id, records = message
            batch = run_task(
                records, options, prepare, on_start=lambda i, t=task_id: conn.send(("start", t, i))
            )
            conn.send(("done", task_id, batch))
    finally:
        # a `prepare` that holds connections (a PACS scan's) closes them politely: a worker
        # with an association still open would not exit, and be killed after a wait
        close = getattr(prepare, "close", None)
        if close is not None:
            close()


@dataclass(slots=True)
class _Task:
    task_id: int
    records: list[ImageRecord]
    silent_crashes: int = 0


@dataclass(slots=True)
class _Worker:
    process: Any
    conn: connection.Connection
    tasks: deque[_Task] = field(default_factory=deque)
    current: int | None = None  # index in tasks[0] of the file being worked on
    started: float = 0.0
    files_done: int = 0


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-exitcode).name
        return f"signal {-exitcode}"
    return f"exit {exitcode}"


class WorkerPool:
    """Decode processes with per-file crash and time-out isolation.

    Parameters
    ----------
    context:
        A multiprocessing context (batchscan uses ``forkserver``: the main process holds
        TensorFlow, which must not be forked).
    workers:
        Number of processes.
    options:
        Options of the per-file stages.
    prepare:
        The per-record function the workers run (a module-level function, so it pickles).
    file_timeout:
        Seconds one file may take.
    depth:
        Tasks queued per worker.
    recycle_after:
        Files after which an idle worker is replaced by a fresh process.
    """

    def __init__(
        self,
        context: BaseContext,
        workers: int,
        options: StageOptions,
        prepare: PrepareRecord,
        *,
        file_timeout: float = DEFAULT_FILE_TIMEOUT,
        depth: int = 2,
        recycle_after: int = DEFAULT_RECYCLE_AFTER,
    ) -> None:
        if workers < 1:
            raise ValueError("WorkerPool needs at least one worker")
        self._context, self._options, self._prepare = context, options, prepare
        self._file_timeout, self._depth = file_timeout, depth
        self._recycle_after = recycle_after
        self.recycled = 0
        self._workers = [self._start() for _ in range(workers)]
        self._next_id = 0
        self.crashes = 0
        self.timeouts = 0

    def _start(self) -> _Worker:
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(  # type: ignore[attr-defined]
            target=_worker_main, args=(child, self._options, self._prepare), daemon=True
        )
        process.start()
        child.close()
        return _Worker(process=process, conn=parent)

    def _send(self, worker: _Worker, task: _Task) -> bool:
        try:
            worker.conn.send((task.task_id, task.records))
        except (BrokenPipeError, OSError):
            return False
        worker.tasks.append(task)
        return True

    def _retire(
        self, worker: _Worker, reason: str, detail: str, requeue: deque[_Task]
    ) -> list[ImageRecord]:
        """Kill `worker`, blame its current file, requeue the rest; returns failed records."""
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=10)
        worker.conn.close()
        failed: list[ImageRecord] = []
        tasks = list(worker.tasks)
        if tasks:
            first = tasks[0]
            if worker.current is not None:
                culprit = first.records[worker.current]
                failed.append(culprit.fail(reason, detail))
                rest = first.records[: worker.current] + first.records[worker.current + 1 :]
                if rest:
                    tasks[0] = _Task(self._new_id(), rest)
                else:
                    tasks.pop(0)
            else:  # died before it started any file of this task
                first.silent_crashes += 1
                if first.silent_crashes > _MAX_SILENT_CRASHES:
                    failed += [r.fail(reason, detail) for r in first.records]
                    tasks.pop(0)
        for task in reversed(tasks):
            requeue.appendleft(task)
        index = self._workers.index(worker)
        self._workers[index] = self._start()
        return failed

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def run(self, tasks: Iterable[list[ImageRecord]]) -> Iterator[PreparedBatch]:
        """Prepare every task; yields batches as they finish (failures as their own batch)."""
        source = iter(tasks)
        queue: deque[_Task] = deque()
        exhausted = False
        while True:
            # hand out work: requeued tasks first, then new ones, up to `depth` per worker
            for index, worker in enumerate(self._workers):
                while len(worker.tasks) < self._depth:
                    if not queue and not exhausted:
                        records = next(source, None)
                        if records is None:
                            exhausted = True
                        else:
                            queue.append(_Task(self._new_id(), records))
                    if not queue:
                        break
                    if worker.files_done >= self._recycle_after:
                        if worker.tasks:
                            break  # due for a fresh process: it drains what it holds first
                        self._stop(worker)
                        worker = self._workers[index] = self._start()
                        self.recycled += 1
                    task = queue.popleft()
                    if not self._send(worker, task):
                        queue.appendleft(task)
                        break
            busy = [w for w in self._workers if w.tasks]
            if not busy:
                if exhausted and not queue:
                    return
                continue
            now = time.monotonic()
            deadlines = [w.started + self._file_timeout for w in busy if w.current is not None]
            wait_for = max(0.0, min(deadlines) - now) if deadlines else 1.0
            handles: list[Any] = [w.conn for w in busy] + [w.process.sentinel for w in busy]
            ready = set(connection.wait(handles, timeout=min(wait_for, 1.0)))
            for worker in busy:
                yield from self._service(worker, ready, queue)

    def _service(
        self, worker: _Worker, ready: set[Any], queue: deque[_Task]
    ) -> Iterator[PreparedBatch]:
        """Read a worker's messages; replace it if it died or timed out."""
        dead = False
        if worker.conn in ready:
            try:
                while worker.conn.poll():
                    kind, task_id, payload = worker.conn.recv()
                    if kind == "start":
                        worker.current, worker.started = int(payload), time.monotonic()
                        continue
                    finished = worker.tasks.popleft()
                    assert finished.task_id == task_id, "worker answered out of order"
                    worker.current = None
                    worker.files_done += len(finished.records)
                    yield payload
            except (EOFError, OSError):
                dead = True  # the pipe closed: the process is gone or going
        if dead or worker.process.sentinel in ready or not worker.process.is_alive():
            worker.process.join(timeout=10)
            self.crashes += 1
            detail = f"decode process ended ({_signal_name(worker.process.exitcode)})"
            failed = self._retire(worker, WORKER_CRASH, detail, queue)
        elif worker.current is not None and time.monotonic() - worker.started > self._file_timeout:
            self.timeouts += 1
            failed = self._retire(
                worker, TIMEOUT, f"no result after {self._file_timeout:g} s", queue
            )
        else:
            return
        if failed:
            yield PreparedBatch(records=failed, inputs=empty_inputs(), index=np.empty(0, np.int64))

    def close(self) -> None:
        """Stop every worker (politely, then by force)."""
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        for worker in self._workers:
            self._stop(worker, asked=True)

    @staticmethod
    def _stop(worker: _Worker, asked: bool = False) -> None:
        """Ask an idle worker to exit (unless `asked` already), then make sure it did."""
        if not asked:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5)
        worker.conn.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
