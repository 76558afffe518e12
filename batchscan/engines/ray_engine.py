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

* actors are not restarted by Ray (``max_restarts`` 0): an actor only dies when its node or
  process goes (file-level crashes never reach Ray, the WorkerPool inside takes them), and
  then the driver re-submits (below). Measured on a cluster started with ``ray start``: with
  Ray's restarts on, an actor of a killed node waited to be restarted for a CPU that the
  surviving actors held, and the run hung;
* per-file time limits are the WorkerPool's ``--file-timeout``: Ray has no per-task
  timeout, and killing a whole actor for one slow file would lose its neighbours' work;
* a node lost under a run (its raylet killed, the machine gone) is the driver's business:
  when a window's execution fails with a Ray error, the driver waits until the cluster has
  declared the node dead (its alive nodes shrink; at most :data:`NODE_DEATH_WAIT`), so that
  the next actor pool is sized for and placed on the nodes that are left, then submits again
  only the records that have not come back, up to :data:`NODE_LOSS_ATTEMPTS` times. A record
  comes back once, so no file is lost or scored twice.

Before any file is read, a run on a cluster checks it (:func:`unreachable`, :func:`preflight`):
the head answers, and accepts this process's token (token authentication, ``RAY_AUTH_MODE=
token``; a missing or wrong token is exit 2 naming ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``
within seconds, where Ray itself retries for 20 s and says "Failed to connect"); every node
with CPUs runs the same batchscan and Ray versions as the driver (exit 2 naming both); and
every such node can read the archive at the same path (exit 2 naming the node: the archive
is mounted read-only at the same path everywhere, or the run does not start).

Ray is an optional extra (``pip install 'batchscan[ray]'``); nothing else imports this
module, and it imports Ray only when a run starts.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa

from batchscan.engines.pipeline import (
    RunStats,
    ScanConfig,
    Sink,
    check_accounting,
    default_workers,
    worker_context,
)
from batchscan.engines.workers import PrepareRecord, WorkerPool
from batchscan.ingest.header import StageOptions
from batchscan.ingest.preprocess import CHANNELS, INPUT_SIZE
from batchscan.ingest.records import ImageRecord, chunks
from batchscan.ingest.sources import PACS_UNAVAILABLE, PacsUnavailableError
from batchscan.scoring.input_store import decode, encode

#: Records handed to Ray per Dataset: bounds the driver's memory on any archive size.
RAY_WINDOW: Final = 50_000
#: Actor restarts by Ray (none: the driver re-submits what a lost actor did not return).
RAY_RETRIES: Final = 0
#: Times one window is submitted when Ray loses part of the cluster under it.
NODE_LOSS_ATTEMPTS: Final = 5
#: Seconds before submitting a window again, times the attempt number (after a failure that
#: lost no node: a transient error).
NODE_LOSS_PAUSE: Final = 5.0
#: Seconds to wait for the cluster to declare a lost node dead (Ray's health checks take
#: about 35 s by default); work placed on it before that fails or waits again.
NODE_DEATH_WAIT: Final = 90.0
#: Seconds the nodes have to answer the preflight.
PREFLIGHT_TIMEOUT: Final = 60.0

log = logging.getLogger(__name__)


class ClusterError(ValueError):
    """The Ray cluster cannot run this scan as it is (exit 2): the message says why."""


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

    def __init__(
        self,
        model_path: str,
        batch_size: int,
        jit_compile: bool,
        precision: str,
        shadow_path: str | None = None,
    ):
        from batchscan.scoring.infer import Scorer
        from batchscan.scoring.model import load_model

        def scorer(path: str) -> Scorer:
            return Scorer(
                load_model(Path(path)),
                batch_size,
                jit_compile=jit_compile,
                precision=precision,  # type: ignore[arg-type]
            )

        self._scorer = scorer(model_path)
        self._shadow = scorer(shadow_path) if shadow_path is not None else None

    def __call__(self, table: pa.Table) -> pa.Table:
        """The records of `table`, those with an input scored; the inputs go back to the
        driver in the input store's encoding (8 KB, not 48), for the store."""
        records = from_table(table)
        blobs = table.column("input").to_pylist()
        todo = [i for i, blob in enumerate(blobs) if blob is not None]
        if not todo:
            return to_table(records)
        shape = (INPUT_SIZE, INPUT_SIZE, CHANNELS)
        inputs = np.stack([np.frombuffer(blobs[i], np.float32).reshape(shape) for i in todo])
        scores = self._scorer.score_ood(inputs)
        if self._shadow is not None:
            scores = replace(scores, shadow=np.clip(self._shadow.score(inputs), 0.0, 1.0))
        for k, i in enumerate(todo):
            scores.apply(records[i], k)
        encoded = dict(zip(todo, (encode(x) for x in inputs), strict=True))
        stored = [encoded.get(i) for i in range(len(records))]
        return to_table(records).append_column("stored_input", pa.array(stored, pa.binary()))


#: Seconds to wait for a Ray cluster's head to accept a connection before giving up.
CONNECT_TIMEOUT: Final = 10.0


def unreachable(address: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """Why the Ray cluster at `address` cannot be used, or None if its head answers and
    accepts this process's token.

    Ray itself retries an unreachable head without end, which would hang a cron job; a plain
    TCP connection to ``host:port`` (``ray://host:port`` for Ray Client) tells within
    `timeout` seconds. Then, for a head's GCS address (not Ray Client), one GCS call with
    this process's token (:func:`token_problem`). ``auto`` (the cluster this node belongs
    to) is left to Ray.
    """
    if address == "auto":
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return f"not HOST:PORT or ray://HOST:PORT: {address!r}"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        return f"no answer from {host}:{port} ({exc.strerror or type(exc).__name__})"
    if address.startswith("ray://"):
        return None
    return token_problem(f"{host}:{port}", timeout)


def auth_token() -> tuple[str | None, str]:
    """The token this process will present, as Ray looks for it (``RAY_AUTH_TOKEN``, then
    the file ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``), and where it came from.

    Raises
    ------
    ClusterError
        ``RAY_AUTH_TOKEN_PATH`` names a file that cannot be read or is empty (Ray aborts).
    """
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ClusterError(
                f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token ({exc.strerror})"
            ) from None
        if not token:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: the file is empty")
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    try:
        token = default.read_text(encoding="utf-8").strip()
    except OSError:
        return None, "no RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
    return (token or None), str(default)


def token_problem(address: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """Why the GCS at `address` refuses this process (a token missing or wrong), or None.

    One ``GetClusterId`` call with the token as Ray sends it (``authorization: Bearer``),
    answered in milliseconds; Ray's own connect retries for 20 s and then says only "Failed
    to connect to Ray cluster".
    """
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    try:
        token, source = auth_token()
    except ClusterError as exc:
        return str(exc)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout, metadata=metadata
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                given = "none was given" if token is None else f"the one from {source} is wrong"
                return (
                    f"the cluster wants its authentication token and {given}: set "
                    "RAY_AUTH_TOKEN to the token the cluster was started with (or "
                    "RAY_AUTH_TOKEN_PATH to a file holding it), with RAY_AUTH_MODE=token"
                )
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return f"the head at {address} does not answer as a Ray GCS ({exc.code().name})"
    return None


def node_facts(archive: str | None) -> dict[str, Any]:
    """What one node runs and sees (a Ray task pinned to the node runs this there; no
    archive folder for a PACS)."""
    import ray

    from batchscan import __version__

    readable = archive is None or (os.path.isdir(archive) and os.access(archive, os.R_OK | os.X_OK))
    return {
        "batchscan": __version__,
        "ray": ray.__version__,
        "host": socket.gethostname(),
        "archive_readable": readable,
    }


def preflight(archive: Path | None, timeout: float = PREFLIGHT_TIMEOUT) -> int:
    """Check every alive node with CPUs before any file is read; returns how many.
    `archive` None: a PACS, which every node reaches itself (no folder to check).

    Raises
    ------
    ClusterError
        A node runs another batchscan or Ray version than this driver, cannot read the
        archive at the same path, cannot run batchscan at all, or does not answer.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from batchscan import __version__

    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if not nodes:
        raise ClusterError("the Ray cluster has no node with CPUs to decode on")
    task = ray.remote(num_cpus=0, max_retries=0)(node_facts)
    pending = {
        n["NodeManagerAddress"] + " " + n["NodeID"][:8]: task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(None if archive is None else str(archive))
        for n in nodes
    }
    for name, ref in pending.items():
        try:
            facts = ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"node {name} did not answer within {timeout:.0f} s") from None
        except ray.exceptions.RayError as exc:
            cause = str(exc).strip().splitlines()[-1][:300]
            raise ClusterError(f"node {name} cannot run batchscan: {cause}") from None
        for what, mine in (("batchscan", __version__), ("Ray", ray.__version__)):
            theirs = facts["batchscan" if what == "batchscan" else "ray"]
            if theirs != mine:
                raise ClusterError(
                    f"node {name} ({facts['host']}) runs {what} {theirs}, this driver {what} "
                    f"{mine}: install the same release on every node"
                )
        if not facts["archive_readable"]:
            raise ClusterError(
                f"node {name} ({facts['host']}) cannot read the archive at {archive}: mount it "
                "(read-only) at the same path on every node"
            )
    return len(nodes)


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
    """``Dataset.map_batches`` with :data:`RAY_RETRIES` restarts for the actor pool.

    Ray Data's default would be endless restarts and retries, which on a lost node waited for
    CPUs held by the surviving actors (the run hung); with none, the loss fails the window at
    once and the driver re-submits what did not come back (:func:`run_ray`), and a
    systematically dying actor (a node that cannot load the model) fails the run after
    :data:`NODE_LOSS_ATTEMPTS` instead of looping. Ray 2.60 takes these only through the
    deprecated ``ray_remote_args`` (pyproject pins ``ray<2.64``), hence the warning filter.
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
    sink: Sink,
    progress: Callable[[RunStats], None] | None = None,
    stats: RunStats | None = None,
) -> RunStats:
    """Run `records` through the stages on Ray; finished records go to `sink` (completion
    order). Same contract as :func:`batchscan.engines.pipeline.run_local`."""
    import ray

    stats = stats if stats is not None else RunStats()
    started = None
    try:
        for window in chunks(records, RAY_WINDOW):
            if started is None:  # the first window: only now is Ray worth starting
                started = _start_ray(config)
                if config.ray_address:
                    preflight(None if config.pacs else Path(config.archive).resolve())
                context = ray.data.DataContext.get_current()
                context.enable_progress_bars = False
                context.print_on_execution_start = False
            stats.found += len(window)
            remaining = window
            for attempt in range(1, NODE_LOSS_ATTEMPTS + 1):
                returned: set[str] = set()
                alive = _alive_nodes()
                try:
                    for finished, inputs in _window(config, remaining, model_path):
                        finished, inputs, lost = _without_lost(finished, inputs)
                        returned.update(r.path for r in finished)
                        stats.count(finished)
                        sink(finished, inputs)
                        if progress is not None:
                            progress(stats)
                        if lost is not None:  # the PACS went away under the run
                            raise PacsUnavailableError(lost)
                    break
                except ray.exceptions.RayError as exc:
                    remaining = [r for r in remaining if r.path not in returned]
                    if not remaining:
                        break
                    if attempt == NODE_LOSS_ATTEMPTS:
                        raise
                    log.warning(
                        "Ray lost part of the cluster under the run (%s); %d files of this "
                        "window not back, submitted again (attempt %d of %d) once the cluster "
                        "has settled",
                        type(exc).__name__,
                        len(remaining),
                        attempt + 1,
                        NODE_LOSS_ATTEMPTS,
                    )
                    if not _await_node_loss(alive, NODE_DEATH_WAIT):
                        time.sleep(NODE_LOSS_PAUSE * attempt)
    finally:
        if started:
            ray.shutdown()
    check_accounting(stats)
    return stats


def _without_lost(
    records: list[ImageRecord], inputs: dict[int, np.ndarray]
) -> tuple[list[ImageRecord], dict[int, np.ndarray], str | None]:
    """The records (and inputs, by position) of a batch from the cluster without those an
    actor could not fetch because the PACS went away, and why (None when none)."""
    lost = [r for r in records if r.reason == PACS_UNAVAILABLE]
    if not lost:
        return records, inputs, None
    kept = [i for i, r in enumerate(records) if r.reason != PACS_UNAVAILABLE]
    moved = {old: new for new, old in enumerate(kept)}
    return (
        [records[i] for i in kept],
        {moved[i]: x for i, x in inputs.items() if i in moved},
        lost[0].detail or "the PACS went away",
    )


def _alive_nodes() -> set[str]:
    """IDs of the nodes the cluster counts alive now."""
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _await_node_loss(before: set[str], timeout: float) -> bool:
    """Wait until a node of `before` is no longer counted alive; False after `timeout`
    seconds without that (the failure lost no node)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if before - _alive_nodes():
            return True
        time.sleep(1.0)
    return False


def _window(
    config: ScanConfig, records: list[ImageRecord], model_path: Path
) -> Iterable[tuple[list[ImageRecord], dict[int, np.ndarray]]]:
    """One window of records through the prepare and score actors; finished records in
    batches, in completion order, each with the model inputs of those scored."""
    import ray

    cpus, gpus = cluster_resources()
    # one block per task, made here: a repartition would run CPU tasks beside the actors,
    # and on a cluster left with one CPU after a node loss the actor holding it waited for
    # a split task that waited for the CPU (measured: the run hung)
    dataset = ray.data.from_arrow(
        [to_table(part) for part in chunks(records, config.files_per_task)]
    )
    dataset = _map_batches(
        dataset,
        PrepareActor,
        fn_constructor_kwargs={
            "options": config.stage_options,
            "prepare": config.prepare,
            "file_timeout": config.worker_timeout,
        },
        batch_size=config.files_per_task,
        batch_format="pyarrow",
        zero_copy_batch=True,
        # a PACS: one connection per actor, at most --pacs-connections of them
        compute=ray.data.ActorPoolStrategy(
            min_size=1,
            max_size=max(
                1, cpus if config.pacs is None else min(cpus, config.pacs.pacs_connections)
            ),
        ),
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
            "shadow_path": str(config.shadow_model) if config.shadow_model else None,
        },
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, gpus)),
        num_gpus=1 if gpus else 0,
        num_cpus=0 if not gpus else 1,
    )
    _quiet_ray_data()
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        stored = (
            table.column("stored_input").to_pylist() if "stored_input" in table.column_names else []
        )
        inputs = {i: decode(blob) for i, blob in enumerate(stored) if blob is not None}
        yield from_table(table), inputs
