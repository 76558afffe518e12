"""The Ray engine: the same stages as the local engine, spread over a Ray cluster.

``batchscan scan ... --engine ray [--ray-address ADDR]`` runs here. Discovery, the
incremental state, aggregation and the reports stay in the driver (this process), exactly as
with the local engine; only the expensive middle moves to the cluster, as a Ray Dataset::

    records from discovery (driver, streamed in windows of RAY_WINDOW records)
      -> map_batches(PrepareActor)   CPU actors, one CPU each; each runs the local
                                     engine's WorkerPool with one decode process, so a
                                     file that crashes or hangs a codec costs that file
                                     (worker_crash / timeout), as on one machine
      -> map_batches(ScoreActor)     the model loaded once per actor; one GPU per actor
                                     when the cluster has GPUs, else on a CPU node
      -> iter_batches back to the driver -> the same sink as the local engine.

Ray settings, chosen on purpose:

* actors are restarted (``max_restarts``) and their calls retried (``max_task_retries``)
  :data:`RAY_RETRIES` times: an actor only dies when its node or process goes (file-level
  crashes never reach Ray, the WorkerPool inside takes them), and every call is a pure
  function of files on shared storage, so a retry on another node gives the same rows;
* per-file time limits are the WorkerPool's ``--file-timeout``: Ray has no per-task
  timeout, and killing a whole actor for one slow file would lose its neighbours' work.

Ray is an optional extra (``pip install 'batchscan[ray]'``); nothing else imports this
module, and it imports Ray only when a run starts.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa

from batchscan.header import StageOptions
from batchscan.pipeline import (
    RunStats,
    ScanConfig,
    check_accounting,
    default_workers,
    worker_context,
)
from batchscan.preprocess import CHANNELS, INPUT_SIZE
from batchscan.records import ImageRecord, chunks
from batchscan.workers import PrepareRecord, WorkerPool

#: Records handed to Ray per Dataset: bounds the driver's memory on any archive size.
RAY_WINDOW: Final = 50_000
#: Actor restarts and call retries after an actor's process or node is lost.
RAY_RETRIES: Final = 3
_INPUT_BYTES: Final = INPUT_SIZE * INPUT_SIZE * CHANNELS * 4
#: Arrow types of the record fields, from their annotations; file names travel as their
#: bytes (a name that is not UTF-8 is a surrogate-escaped str, which Arrow strings refuse).
_ARROW_TYPES: Final = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
_PATHS: Final = ("path", "abs_path")
RECORD_SCHEMA: Final = pa.schema(
    [
        pa.field(
            f.name,
            pa.binary()
            if f.name in _PATHS
            else _ARROW_TYPES.get(str(f.type).split(" |")[0], pa.string()),
        )
        for f in fields(ImageRecord)
    ]
)
_NAMES: Final = tuple(RECORD_SCHEMA.names)


def to_table(records: list[ImageRecord], inputs: dict[int, np.ndarray] | None = None) -> pa.Table:
    """Records (and the model inputs of some of them, by position) as an Arrow table."""
    columns: dict[str, Any] = {n: [getattr(r, n) for r in records] for n in _NAMES}
    for name in _PATHS:
        columns[name] = [os.fsencode(value) for value in columns[name]]
    table = pa.Table.from_pydict(columns, schema=RECORD_SCHEMA)
    if inputs is None:
        return table
    blobs = [
        inputs[i].astype(np.float32).tobytes() if i in inputs else None for i in range(len(records))
    ]
    return table.append_column("input", pa.array(blobs, pa.binary()))


def from_table(table: pa.Table) -> list[ImageRecord]:
    """The records of a table made by :func:`to_table` (extra columns ignored)."""
    columns = {n: table.column(n).to_pylist() for n in _NAMES}
    for name in _PATHS:
        columns[name] = [os.fsdecode(value) for value in columns[name]]
    return [ImageRecord(**{n: columns[n][i] for n in _NAMES}) for i in range(table.num_rows)]


class PrepareActor:
    """Header -> decode -> normalize -> preprocess for batches of records, on one CPU, with
    the local engine's per-file crash and time-out isolation (one decode process)."""

    def __init__(self, options: StageOptions, prepare: PrepareRecord, file_timeout: float):
        self._pool = WorkerPool(worker_context(), 1, options, prepare, file_timeout=file_timeout)

    def __call__(self, table: pa.Table) -> pa.Table:
        """Prepared records, with a binary ``input`` column for those that need scoring."""
        records, inputs = [], {}
        for batch in self._pool.run([from_table(table)]):
            for k, position in enumerate(batch.index):
                inputs[len(records) + int(position)] = batch.inputs[k]
            records += batch.records
        return to_table(records, inputs)


class ScoreActor:
    """Scores the prepared inputs of a batch with a model loaded once per actor."""

    def __init__(self, model_path: str, batch_size: int, jit_compile: bool, precision: str):
        from batchscan.infer import Scorer
        from batchscan.model import load_model

        self._scorer = Scorer(
            load_model(Path(model_path)),
            batch_size,
            jit_compile=jit_compile,
            precision=precision,  # type: ignore[arg-type]
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        """The records of `table`, those with an input scored; the inputs dropped."""
        records = from_table(table)
        blobs = table.column("input").to_pylist()
        todo = [i for i, blob in enumerate(blobs) if blob is not None]
        if todo:
            shape = (INPUT_SIZE, INPUT_SIZE, CHANNELS)
            inputs = np.stack([np.frombuffer(blobs[i], np.float32).reshape(shape) for i in todo])
            scores = self._scorer.score_ood(inputs)
            for k, i in enumerate(todo):
                scores.apply(records[i], k)
        return to_table(records)


#: Seconds to wait for a Ray cluster's head to accept a connection before giving up.
CONNECT_TIMEOUT: Final = 10.0


def unreachable(address: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """Why the Ray cluster at `address` cannot be reached, or None if its head answers.

    Ray itself retries an unreachable head without end, which would hang a cron job; a plain
    TCP connection to ``host:port`` (``ray://host:port`` for Ray Client) tells within
    `timeout` seconds. ``auto`` (the cluster this node belongs to) is left to Ray.
    """
    if address == "auto":
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return f"not HOST:PORT or ray://HOST:PORT: {address!r}"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return f"no answer from {host}:{port} ({exc.strerror or type(exc).__name__})"


def _start_ray(config: ScanConfig) -> bool:
    """Connect to the cluster (or start a local instance); True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,  # cron mails what a job prints
    }
    if config.ray_address:
        ray.init(address=config.ray_address, **options)
    else:
        ray.init(num_cpus=config.workers or default_workers(), **options)
    return True


def _quiet_ray_data() -> None:
    """Only errors from Ray Data on the console: it logs every execution at INFO, and cron
    mails what a job prints. (Ray Data configures its logger when first used, so this runs
    just before each execution.)"""
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def cluster_resources() -> tuple[int, int]:
    """(CPUs, GPUs) of the connected cluster."""
    import ray

    resources = ray.cluster_resources()
    return int(resources.get("CPU", 1)), int(resources.get("GPU", 0))


def _map_batches(dataset: Any, fn: type, **arguments: Any) -> Any:
    """``Dataset.map_batches`` with :data:`RAY_RETRIES` for the actor pool.

    Ray Data's default would be endless restarts and retries; a bounded count turns a
    systematically dying actor (a node that cannot load the model) into a failed run instead
    of a loop. Ray 2.60 takes these only through the deprecated ``ray_remote_args``
    (pyproject pins ``ray<2.64``), hence the warning filter.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        return dataset.map_batches(
            fn, max_restarts=RAY_RETRIES, max_task_retries=RAY_RETRIES, **arguments
        )


def run_ray(
    config: ScanConfig,
    records: Iterable[ImageRecord],
    model_path: Path,
    sink: Callable[[list[ImageRecord]], None],
    progress: Callable[[RunStats], None] | None = None,
    stats: RunStats | None = None,
) -> RunStats:
    """Run `records` through the stages on Ray; finished records go to `sink` (completion
    order). Same contract as :func:`batchscan.pipeline.run_local`."""
    import ray

    stats = stats if stats is not None else RunStats()
    started = None
    try:
        for window in chunks(records, RAY_WINDOW):
            if started is None:  # the first window: only now is Ray worth starting
                started = _start_ray(config)
                context = ray.data.DataContext.get_current()
                context.enable_progress_bars = False
                context.print_on_execution_start = False
                cpus, gpus = cluster_resources()
            stats.found += len(window)
            dataset = ray.data.from_arrow(to_table(window)).repartition(
                max(1, -(-len(window) // config.files_per_task))
            )
            dataset = _map_batches(
                dataset,
                PrepareActor,
                fn_constructor_kwargs={
                    "options": config.stage_options,
                    "prepare": config.prepare,
                    "file_timeout": config.file_timeout,
                },
                batch_size=config.files_per_task,
                batch_format="pyarrow",
                zero_copy_batch=True,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cpus)),
                num_cpus=1,
            )
            dataset = _map_batches(
                dataset,
                ScoreActor,
                fn_constructor_kwargs={
                    "model_path": str(model_path),
                    "batch_size": config.batch_size,
                    "jit_compile": config.jit_compile,
                    "precision": config.precision,
                },
                batch_size=config.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, gpus)),
                num_gpus=1 if gpus else 0,
                num_cpus=0 if not gpus else 1,
            )
            _quiet_ray_data()
            for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                finished = from_table(table)
                stats.count(finished)
                sink(finished)
                if progress is not None:
                    progress(stats)
    finally:
        if started:
            ray.shutdown()
    check_accounting(stats)
    return stats
