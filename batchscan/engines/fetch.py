"""The decode workers of a PACS scan: fetch each instance, then run the same stages.

A folder scan's workers open a file by its path; a PACS scan's fetch the instance by its
locator (``STUDY/SERIES/SOP`` in the record's ``path``) and hand the bytes to the same
header, decode, preprocess and sanity stages (:func:`batchscan.engines.pipeline.prepare_display`
reads bytes as it reads a file), so a PACS scores what a folder of the same files scores.
The fetches run where the decoding runs, in the worker processes of the local engine and
the actors of the Ray engine, so that the bytes never pass through the main process.

Each worker process opens its own source (:func:`worker_source`, once per process) and
holds one connection to the PACS, on a thread that fetches the next instance of its task
while the process decodes the current one (:meth:`FetchingPrepare.begin_task`). A scan
therefore holds as many connections as it has decode processes, which the scan bounds by
``--pacs-connections``.

What can happen to a fetch becomes a value on the record, as everything else does:

* a bad answer for the instance (:class:`~batchscan.ingest.sources.FetchError`): a failed
  row with its reason;
* the PACS down or silent (:class:`~batchscan.ingest.sources.PacsUnavailableError`), or a
  source that cannot be opened here: the record is marked
  :data:`~batchscan.ingest.sources.PACS_UNAVAILABLE`, which is no row: the engine keeps
  what came back before it and stops the run (:func:`lost_pacs`).
"""

from __future__ import annotations

import contextlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final

import numpy as np

from batchscan.engines.pipeline import prepare_display
from batchscan.engines.workers import PreparedBatch
from batchscan.ingest.header import StageOptions
from batchscan.ingest.records import ImageRecord
from batchscan.ingest.sources import (
    PACS_UNAVAILABLE,
    FetchError,
    Locator,
    PacsSource,
    PacsUnavailableError,
    SourceConfigError,
    SourceOptions,
    open_source,
)

#: The sources this process opened, by URL and options, each with the one thread that
#: fetches from it (one per process: a worker reuses its connection for every task; the
#: thread holds the connection, as the sources keep one per thread).
_SOURCES: dict[tuple[str, SourceOptions], tuple[PacsSource, ThreadPoolExecutor]] = {}
#: Instances fetched ahead of the one being decoded, per process.
FETCH_AHEAD: Final = 1


def worker_source(url: str, options: SourceOptions) -> tuple[PacsSource, ThreadPoolExecutor]:
    """This process's source for the PACS at `url` and its fetching thread, opened on first
    use.

    Raises
    ------
    SourceConfigError
        The URL, credentials or TLS files cannot be used here.
    """
    key = (url, options)
    if key not in _SOURCES:
        source = open_source(url, options)
        _SOURCES[key] = (source, ThreadPoolExecutor(1, thread_name_prefix="pacs-fetch"))
    return _SOURCES[key]


def close_worker_sources() -> None:
    """Close the sources this process opened (the scan's own process, after a run that
    fetched in it: ``--workers 0``, the report's pictures, the SR stage)."""
    while _SOURCES:
        _, (source, pool) = _SOURCES.popitem()
        pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(Exception):
            source.close()


def _fetch(source: PacsSource, locator: Locator) -> bytes | FetchError:
    try:
        return source.fetch(locator)
    except FetchError as exc:
        return exc


class FetchingPrepare:
    """The per-record function of a PACS scan's decode workers (a
    :data:`~batchscan.engines.workers.PrepareRecord`): fetch the record's instance, then
    :func:`~batchscan.engines.pipeline.prepare_display` on its bytes.

    It pickles to the workers as its URL and options; the source, its thread and the
    fetches under way are the worker's own.
    """

    def __init__(self, url: str, options: SourceOptions) -> None:
        self.url, self.options = url, options
        self._queue: deque[Locator] = deque()
        self._ahead: dict[str, Future[bytes | FetchError]] = {}
        #: Why the PACS cannot be used any more (the rest of the task is not fetched).
        self._lost: str | None = None

    def __repr__(self) -> str:
        return f"FetchingPrepare({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.url, self.options = state["url"], state["options"]
        self._queue, self._ahead, self._lost = deque(), {}, None

    def begin_task(self, records: list[ImageRecord]) -> None:
        """Start fetching a task's pending instances, in order, :data:`FETCH_AHEAD` ahead
        of the one being decoded, on this process's one connection."""
        for future in self._ahead.values():  # a task left half-way: its fetches abandoned
            future.cancel()
        self._ahead.clear()
        self._lost = None
        self._queue = deque(Locator.from_path(r.path) for r in records if r.pending)
        with contextlib.suppress(SourceConfigError):  # said on the first record
            self._top_up()

    def _top_up(self) -> None:
        source, pool = worker_source(self.url, self.options)
        while self._queue and len(self._ahead) <= FETCH_AHEAD:
            locator = self._queue.popleft()
            self._ahead[locator.path] = pool.submit(_fetch, source, locator)

    def _fetched(self, record: ImageRecord) -> bytes | None:
        """The record's bytes; None with the record decided when there are none."""
        if self._lost is not None:
            record.fail(PACS_UNAVAILABLE, self._lost)
            return None
        try:
            future = self._ahead.pop(record.path, None)
            if future is None:  # not announced by its task (in-process callers, tests)
                source, _ = worker_source(self.url, self.options)
                got = _fetch(source, Locator.from_path(record.path))
            else:
                self._top_up()
                got = future.result()
        except (PacsUnavailableError, SourceConfigError) as exc:
            self._lost = str(exc) if isinstance(exc, PacsUnavailableError) else f"PACS: {exc}"
            self._queue.clear()
            record.fail(PACS_UNAVAILABLE, self._lost)
            return None
        if isinstance(got, FetchError):
            record.fail(got.reason, got.detail)
            return None
        return got

    def close(self) -> None:
        """Close this process's connections to the PACS (a decode worker that stops)."""
        close_worker_sources()

    def __call__(self, record: ImageRecord, options: StageOptions) -> np.ndarray | None:
        """The model input of the record's instance, or None (the record is decided)."""
        if not record.pending:
            return None
        content = self._fetched(record)
        if content is None:
            return None
        record.size = len(content)
        prepared = prepare_display(record, options, content)
        return None if prepared is None else prepared[1]


class InstanceReader:
    """Fetches a PACS's instances one at a time in the calling process, by their path
    (``STUDY/SERIES/SOP``): for the pictures of report.html and the headers of the SR
    stage, which read a scanned instance again. After the PACS was found gone once it
    answers at once with the same error, so that a page or an SR stage over a dead PACS
    costs one timeout, not one a picture. It pickles as its URL and options (the SR stage's
    worker processes open their own source).
    """

    def __init__(self, url: str, options: SourceOptions) -> None:
        self.url, self.options = url, options
        self._lost: PacsUnavailableError | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.url, self.options, self._lost = state["url"], state["options"], None

    def __call__(self, path: str) -> bytes:
        """The instance's bytes as the PACS stores them.

        Raises
        ------
        batchscan.ingest.sources.FetchError
            A bad answer for this instance, or `path` is no locator.
        batchscan.ingest.sources.PacsUnavailableError
            The PACS is gone (now or before).
        batchscan.ingest.sources.SourceConfigError
            The PACS cannot be asked from here.
        """
        if self._lost is not None:
            raise self._lost
        try:
            locator = Locator.from_path(path)
        except ValueError as exc:
            raise FetchError("fetch_error:bad_locator", str(exc)) from None
        source, _ = worker_source(self.url, self.options)
        try:
            return source.fetch(locator)
        except PacsUnavailableError as exc:
            self._lost = exc
            raise


def lost_pacs(batch: PreparedBatch) -> tuple[PreparedBatch, str | None]:
    """`batch` without its records marked :data:`~batchscan.ingest.sources.PACS_UNAVAILABLE`,
    and the message of the first of them (None when there are none): the engine hands on
    the rest and then stops the run with that message."""
    lost = [i for i, r in enumerate(batch.records) if r.reason == PACS_UNAVAILABLE]
    if not lost:
        return batch, None
    message = batch.records[lost[0]].detail or "the PACS went away"
    dropped = set(lost)
    kept = [i for i in range(len(batch.records)) if i not in dropped]
    position = {old: new for new, old in enumerate(kept)}
    inputs = [k for k, i in enumerate(batch.index) if int(i) in position]
    return (
        PreparedBatch(
            records=[batch.records[i] for i in kept],
            inputs=batch.inputs[inputs],
            index=np.asarray([position[int(batch.index[k])] for k in inputs], np.int64),
        ),
        message,
    )
