"""Incremental state: what every file of the archive was found to be, kept between runs.

A nightly run over an archive that only grows should read only what is new. The state is a
SQLite database (opened by :func:`batchscan.storage.sqlite.open_store`: WAL journal, so a
reader never blocks the run and a ``kill -9`` loses at most the last uncommitted checkpoint;
a schema version row; private files) in REPORT_DIR by default. This module owns its tables:
no SQL of them is written anywhere else, and every reader (the reports, report.html, the
SR stage, monitoring, ``train`` and ``adapt``) asks a method here that says what it wants.

Per file it keeps the report row (status, reason, UIDs, score...) plus what decides whether
the row is still valid: size and mtime (as rsync decides), and the row's :class:`RowKeys`,
five keys that name what made it: the header options, the model input's options and
version, the model's training domain, the model, and the shadow model. A run then:

1. streams discovery through :meth:`StateStore.pending`: a file whose size, mtime and keys
   match a final row is *reused* (marked seen, never opened); a scored file whose row
   differs only in the domain, model or shadow key is *rescored* from the model-input store
   (:mod:`batchscan.scoring.input_store`) when the store holds its input, also without opening it
   (:meth:`StateStore.to_rescore` hands those rows on after the stream); a skipped or failed
   file whose outcome no model changes keeps its row; every other file goes on to the
   stages;
2. stores finished records with :meth:`StateStore.save`, committing a checkpoint every
   :data:`CHECKPOINT_SECONDS`, so a crash costs minutes, not the night;
3. ends with :meth:`StateStore.finish`, one transaction that drops rows of files that
   disappeared, resolves duplicate SOP Instance UIDs and re-aggregates only the studies
   whose files changed (the *touched* studies, kept in a table so that a crash between
   checkpoint and finish loses none of them).

Reports are then written from the state, so they always describe the whole archive.
Nothing in the state identifies a patient: no names, birth dates or free text, and a
patient key only as an HMAC (see :mod:`batchscan.ingest.header`).

This module stores and looks up; it does not know how rows are made or aggregated (the
aggregation is passed in; only the study columns come from :mod:`batchscan.results.aggregate`), so
it sits after the stages it records.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

import pandas as pd

from batchscan import VERSION_COLUMNS
from batchscan.ingest.paths import from_state, readable, state_key
from batchscan.ingest.records import FAILED, SCORED, SKIPPED, ImageRecord, chunks
from batchscan.results.aggregate import STUDY_COLUMNS
from batchscan.storage.sqlite import (
    OnDamage,
    OtherVersionError,
    Schema,
    StoreError,
    open_readonly,
    open_store,
)

STATE_FILE: Final = "state.sqlite"
#: 2: the PACS tables (what each query listed, the high-water mark of each PACS).
SCHEMA_VERSION: Final = 2
#: Seconds between checkpoint commits while a run streams results in.
CHECKPOINT_SECONDS: Final = 30.0
#: Reasons that are worth trying again on the next run: the file may have been half-written
#: or briefly unreadable, a worker may have been killed by the OOM killer, or a bug fixed.
#: (``timeout`` is not retried: a file that hangs a decoder would cost --file-timeout every
#: night.)
RETRY_PREFIXES: Final = (
    "unstable",
    "unreadable",
    "internal_error",
    "worker_crash",
    "fetch_error",  # a PACS that answered badly for one instance may answer well tomorrow
)
DUPLICATE_PREFIX: Final = "duplicate_of:"
#: How a domain key made under ``--out-of-domain score`` begins: under it the domain never
#: changes whether a file is decoded, only how its score is marked.
SCORE_MODE: Final = "score-"
#: Rows per SQL statement when looking up or updating many paths.
_CHUNK: Final = 500

#: The report columns of a file row, in order (``abs_path`` is never stored).
IMAGE_COLUMNS: Final = (
    *(f.name for f in fields(ImageRecord) if f.name != "abs_path"),
    "model_version",
)
#: Scored studies counted at the end of a run (manifest, runs.parquet, the summary line).
RUN_STUDY_COUNTS: Final = (
    "studies",
    "studies_flagged",
    "studies_in_domain",
    "studies_out_of_domain",
    "studies_domain_unknown",
)
RUN_COLUMNS: Final = (
    "run_id",
    "started_at",
    "finished_at",
    "outcome",
    "files_found",
    "files_processed",
    "files_reused",
    "files_removed",
    "scored",
    "skipped",
    "failed",
    "images_scored_this_run",
    "images_per_second",
    "seconds",
    "model_version",
    "code_version",
    *RUN_STUDY_COUNTS,
    "device",
    *VERSION_COLUMNS,
    "row_keys",
)

_INTEGER_COLUMNS: Final = {
    "size",
    "mtime_ns",
    "rows",
    "columns",
    "decode_scale",
    "in_domain",
    "ood",
}
_REAL_COLUMNS: Final = {
    "score",
    "patient_age_years",
    "ood_score",
    "shadow_score",
    "pixel_spacing_mm",
}
#: Columns SQLite keeps as 0/1 that the reports type as booleans.
_BOOL_COLUMNS: Final = ("in_domain", "ood")
_STUDY_TYPES: Final = {
    "study_instance_uid": "TEXT NOT NULL",
    "score": "REAL NOT NULL",
    "flag": "INTEGER NOT NULL",
    "score_basis": "TEXT NOT NULL",
    "n_images_scored": "INTEGER NOT NULL",
    "n_images_total": "INTEGER NOT NULL",
    "in_domain": "INTEGER",
    "model_version": "TEXT NOT NULL",
    "shadow_score": "REAL",
    "shadow_flag": "INTEGER",
}
_RUN_TYPES: Final = {
    "started_at": "TEXT NOT NULL",
    "finished_at": "TEXT",
    "outcome": "TEXT NOT NULL",
    "images_per_second": "REAL",
    "seconds": "REAL",
    "model_version": "TEXT",
    "code_version": "TEXT",
    "device": "TEXT",
    **dict.fromkeys(VERSION_COLUMNS, "TEXT"),
    "row_keys": "TEXT",
}


def _sql_type(name: str) -> str:
    if name in _INTEGER_COLUMNS:
        return "INTEGER"
    return "REAL" if name in _REAL_COLUMNS else "TEXT"


_TABLES: Final = f"""
CREATE TABLE IF NOT EXISTS files (
    {", ".join(f'"{c}" {_sql_type(c)}' for c in IMAGE_COLUMNS)},
    model_score REAL,
    settings_key TEXT NOT NULL,
    seen_run TEXT NOT NULL,
    PRIMARY KEY (path)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_study ON files (study_instance_uid);
CREATE INDEX IF NOT EXISTS files_sop ON files (sop_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    {", ".join(f'"{c}" {_STUDY_TYPES.get(c, "TEXT")}' for c in STUDY_COLUMNS)},
    PRIMARY KEY (study_instance_uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS touched (
    kind TEXT NOT NULL,
    uid TEXT NOT NULL,
    PRIMARY KEY (kind, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    {", ".join(f'"{c}" {_RUN_TYPES.get(c, "INTEGER")}' for c in RUN_COLUMNS[1:])}
) WITHOUT ROWID;
"""
#: A PACS as the archive (schema 2): the study date under which the PACS's query last
#: listed each instance (so that a run that asked for a window of dates removes only the
#: instances of that window that are gone), and each PACS's high-water mark with the
#: late-arrival margin of the run that set it.
_PACS_TABLES: Final = """
CREATE TABLE IF NOT EXISTS pacs_listed (
    path TEXT PRIMARY KEY,
    study_date TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pacs_marks (
    source TEXT PRIMARY KEY,
    high_water TEXT NOT NULL,
    margin_days INTEGER NOT NULL,
    run_id TEXT NOT NULL
) WITHOUT ROWID;
"""


def _add_pacs_tables(db: sqlite3.Connection) -> None:
    """Schema 1 -> 2: the PACS tables (a state of folder scans keeps every row)."""
    for statement in _PACS_TABLES.split(";"):
        if statement.strip():
            db.execute(statement)


#: The state's tables and their version (:mod:`batchscan.storage.sqlite`).
SCHEMA: Final = Schema(
    version=SCHEMA_VERSION, script=_TABLES + _PACS_TABLES, upgrades={1: _add_pacs_tables}
)


class StateError(RuntimeError):
    """The state database cannot be used (another program's file, a newer schema...)."""


@dataclass(frozen=True, slots=True)
class RowKeys:
    """What made a file row, in five keys (stored joined by dots in ``settings_key``).

    Attributes
    ----------
    header:
        What changes the header facts of a row: the row format, the header options, the
        pseudonym key. Another header key means the file is read again.
    input:
        What changes the model input: decode options, the blank rule, the declared input
        version (:data:`batchscan.ingest.preprocess.INPUT_VERSION`). Another input key means the
        file is read again (the stored input is no longer the one this release makes).
    domain:
        ``--out-of-domain`` and a digest of the model card's training domain (beginning
        ``score-`` or ``skip-``): a scored row is judged again from its header facts; a
        skipped or failed one is read again unless both keys are ``score-`` ones.
    model:
        The model and its OOD statistics: a scored row is scored again from its stored
        input.
    shadow:
        The shadow model (``--shadow-model``), or none: likewise.
    """

    header: str
    input: str
    domain: str
    model: str
    shadow: str

    def __str__(self) -> str:
        return ".".join((self.header, self.input, self.domain, self.model, self.shadow))

    @classmethod
    def parse(cls, text: str) -> RowKeys | None:
        """The keys of a stored ``settings_key`` (what :meth:`__str__` wrote), or None for
        a key of an older row format, which is not five keys."""
        parts = text.split(".")
        return cls(*parts) if len(parts) == 5 else None


#: What :func:`decide` says of a stored row.
REUSE: Final = "reuse"
RESCORE: Final = "rescore"
READ: Final = "read"


def decide(stored_key: str, status: str, reason: str | None, keys: RowKeys) -> str:
    """What to do with the row of an unchanged file (same path, size, mtime) whose outcome
    is final: :data:`REUSE` it (with the current keys), :data:`RESCORE` it from its stored
    input (a scored row, or a duplicate, which keeps its model score), or :data:`READ` the
    file again."""
    stored = RowKeys.parse(stored_key)
    if stored == keys:
        return REUSE
    if stored is None or (stored.header, stored.input) != (keys.header, keys.input):
        return READ
    if status == SCORED or (reason or "").startswith(DUPLICATE_PREFIX):
        return RESCORE
    if stored.domain != keys.domain and not (
        stored.domain.startswith(SCORE_MODE) and keys.domain.startswith(SCORE_MODE)
    ):
        # under --out-of-domain skip the domain decides whether a file is decoded at all:
        # a row skipped as out of domain may now be taken in, a decode failure now skipped
        return READ
    return REUSE  # skipped or failed for what no model changes


@dataclass(slots=True)
class Finished:
    """What :meth:`StateStore.finish` changed and the report-level counts after it
    (``seen``: the rows this run found, which a run over a window of a PACS's dates may
    leave fewer than ``files``)."""

    removed: int
    by_status: Counter[str]
    by_reason: Counter[str]
    files: int
    seen: int = 0


class StudyScore(NamedTuple):
    """A study as monitoring joins it to the report labels (:meth:`StateStore.study_scores`)."""

    study_instance_uid: str
    accession_number: str | None
    study_date: str | None
    score: float
    flag: int


class StudyImage(NamedTuple):
    """A scored image with its study's outcome, a row of
    :meth:`StateStore.scored_study_images` (``path`` as stored, :func:`state_key`)."""

    study_instance_uid: str
    study_score: float
    flag: int
    score_basis: str
    study_in_domain: int | None
    path: str | bytes
    size: int
    mtime_ns: int
    sop_instance_uid: str
    sop_class_uid: str | None
    series_instance_uid: str | None
    view: str | None
    score: float
    ood_score: float | None
    ood: int | None
    in_domain: int | None


class StudyGroup(NamedTuple):
    """One group of :meth:`StateStore.study_groups`: its name, studies, mean score and the
    share of them flagged."""

    group: str
    studies: int
    mean_score: float
    flagged_share: float


class RunLine(NamedTuple):
    """A run as report.html lists it (:meth:`StateStore.recent_runs`; ``started`` as
    ``YYYY-MM-DD HH:MM`` UTC)."""

    run_id: str
    started: str
    outcome: str
    files_found: int | None
    files_processed: int | None
    scored: int | None
    skipped: int | None
    failed: int | None
    studies: int | None
    studies_flagged: int | None
    images_per_second: float | None
    seconds: float | None
    model_version: str | None


class FlaggedStudy(NamedTuple):
    """A flagged study as report.html shows it (:meth:`StateStore.top_flagged_studies`)."""

    study_instance_uid: str
    accession_number: str | None
    study_date: str | None
    score: float
    views: str | None
    in_domain: int | None


class ShownImage(NamedTuple):
    """An image report.html shows (``path`` as stored, :func:`state_key`; the accession
    number only where asked for)."""

    path: str | bytes
    score: float
    view: str | None
    accession_number: str | None


_Row = TypeVar("_Row", StudyGroup, RunLine, FlaggedStudy, ShownImage)
#: How report.html groups studies (:meth:`StateStore.study_groups`): by device
#: (manufacturer / model) and by model version.
STUDY_GROUPS: Final = {
    "device": "COALESCE(manufacturer, 'unknown') || ' / ' || COALESCE(manufacturer_model, '?')",
    "model_version": "model_version",
}
#: The rows of :meth:`StateStore.scored_study_images` (the columns of :class:`StudyImage`).
_STUDY_IMAGES_SQL: Final = (
    "SELECT s.study_instance_uid, s.score, s.flag, s.score_basis, s.in_domain, "
    "f.path, f.size, f.mtime_ns, f.sop_instance_uid, f.sop_class_uid, f.series_instance_uid, "
    "f.view, f.score, f.ood_score, f.ood, f.in_domain "
    "FROM studies s JOIN files f ON f.study_instance_uid = s.study_instance_uid "
    "WHERE f.status = ? AND f.sop_instance_uid IS NOT NULL "
    "ORDER BY s.study_instance_uid, f.sop_instance_uid"
)


def _bin(bins: int) -> str:
    """The SQL of a study's score bin, of `bins` equal bins over [0, 1]."""
    return f"MIN(CAST(score * {int(bins)} AS INTEGER), {int(bins) - 1})"


def _study_column(name: str) -> str:
    if name not in STUDY_COLUMNS:
        raise ValueError(f"no study column {name!r}")
    return f'"{name}"'


def _text(value: Any) -> Any:
    """A value SQLite can store: text is made valid UTF-8 (see :mod:`batchscan.ingest.paths`)."""
    return readable(value) if isinstance(value, str) else value


def _retry(reason: str | None) -> bool:
    return reason is not None and reason.startswith(RETRY_PREFIXES)


def _record_of(
    names: list[str], row: tuple[Any, ...], root: str, cleared: set[str] = frozenset()
) -> ImageRecord:
    """The record of a stored row (`names` its columns), under the archive `root`, with the
    `cleared` fields left at their defaults."""
    values = {n: v for n, v in zip(names, row, strict=True) if n not in cleared}
    path = from_state(values.pop("path"))
    for name in _BOOL_COLUMNS:
        if values.get(name) is not None:
            values[name] = bool(values[name])
    return ImageRecord(path=path, abs_path=f"{root}/{path}", **values)


def _known(columns: tuple[str, ...], allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    """`columns`, when all are `allowed` (a typed read names columns, never SQL).

    Raises
    ------
    ValueError
        Naming the columns that are not.
    """
    unknown = set(columns) - set(allowed)
    if unknown:
        raise ValueError(f"not {what} columns: {sorted(unknown)}")
    return columns


def final_rows(
    state_path: Path, paths: list[str | bytes], root: str
) -> dict[str | bytes, tuple[ImageRecord, str]]:
    """The rows of `paths` in the state at `state_path` whose outcome is final (scored, or
    skipped or failed for a reason not worth a retry), read-only (another process, such as
    ``batchscan train``, reading a scan's state while a scan may run), with each row's
    stored keys (``settings_key``). Missing or unreadable state: no rows.
    """
    names = [c for c in IMAGE_COLUMNS if c != "model_version"]
    columns = ", ".join(f'"{c}"' for c in names)
    found: dict[str | bytes, tuple[ImageRecord, str]] = {}
    try:
        db = open_readonly(state_path, SCHEMA)
    except StoreError:
        return found
    try:
        for part in chunks(paths, _CHUNK):
            marks = ",".join("?" * len(part))
            for row in db.execute(
                f"SELECT {columns}, settings_key FROM files WHERE path IN ({marks})", part
            ):
                record = _record_of(names, row[:-1], root)
                if record.status in (SCORED, SKIPPED, FAILED) and not _retry(record.reason):
                    found[row[0]] = (record, row[-1])
    except sqlite3.Error:
        return {}
    finally:
        db.close()
    return found


def scored_files(state_path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """The scored file rows of the state at `state_path`, read-only (``batchscan adapt``
    reading a scan's state while a scan may run): `columns` (of :data:`IMAGE_COLUMNS`) and
    ``input_key``, the input key of each row's :class:`RowKeys` (missing for a row of an
    older format).

    Raises
    ------
    StateError
        The state cannot be read.
    ValueError
        A column the state does not keep.
    """
    wanted = [c for c in columns if c != "input_key"]
    unknown = set(wanted) - set(IMAGE_COLUMNS)
    if unknown:
        raise ValueError(f"no file columns {sorted(unknown)}")
    names = ", ".join(f'"{c}"' for c in (*wanted, "settings_key"))
    try:
        db = open_readonly(state_path, SCHEMA)
        try:
            rows = db.execute(f"SELECT {names} FROM files WHERE status = ?", (SCORED,)).fetchall()
        finally:
            db.close()
    except (StoreError, sqlite3.Error) as exc:
        raise StateError(str(exc)) from None
    frame = pd.DataFrame(rows, columns=[*wanted, "settings_key"])
    keys = frame.pop("settings_key").map(RowKeys.parse)
    frame["input_key"] = [None if k is None else k.input for k in keys]
    return frame


class StateStore:
    """The SQLite state of one REPORT_DIR (opened with its lock held).

    Parameters
    ----------
    path:
        The database file; created with its tables when missing.
    checkpoint_seconds:
        Seconds between commits while results stream in.
    on_commit:
        Called before every checkpoint commits.
    """

    def __init__(
        self,
        path: Path,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.checkpoint_seconds = checkpoint_seconds
        #: Called before each checkpoint commits (the input store commits with the state,
        #: first, so that a row a crash leaves has the input it was saved with).
        self.on_commit = on_commit
        try:  # the state is the only record of the archive: refuse, never start afresh
            self._db = open_store(path, SCHEMA, on_damage=OnDamage.REFUSE)
        except OtherVersionError as exc:
            raise StateError(
                f"state database {path} has schema {exc.found}, this batchscan reads "
                f"{SCHEMA_VERSION}"
            ) from exc
        except StoreError as exc:
            raise StateError(
                f"cannot use state database {path}: {exc} (move it away to start afresh: "
                "the next run then reads the whole archive again)"
            ) from exc
        try:
            self._add_new_columns()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StateError(f"cannot use state database {path}: {exc}") from exc
        self._last_commit = time.monotonic()
        self._db.execute("BEGIN")

    def _add_new_columns(self) -> None:
        """Add the report columns a newer batchscan knows to a state an older one made
        (additive, so the schema version stays; a release that adds file columns raises the
        row format of the header key, so file rows are read again, and their studies
        re-aggregated; older runs keep nulls in the new run columns)."""
        wanted = {
            "files": {c: _sql_type(c) for c in IMAGE_COLUMNS},
            # NOT NULL cannot be added to existing rows: new study columns are nullable
            "studies": {c: _STUDY_TYPES.get(c, "TEXT").split()[0] for c in STUDY_COLUMNS},
            "runs": {c: _RUN_TYPES.get(c, "INTEGER").split()[0] for c in RUN_COLUMNS},
        }
        for table, columns in wanted.items():
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, sql_type in columns.items():
                if name not in have:
                    self._db.execute(f'ALTER TABLE {table} ADD COLUMN "{name}" {sql_type}')

    # -- the run -----------------------------------------------------------------------

    def begin_run(
        self,
        run_id: str,
        started_at: str,
        model_version: str,
        code: str,
        facts: dict[str, Any] | None = None,
    ) -> int:
        """Record the run as ``running``, with `facts` (columns of :data:`RUN_COLUMNS`: the
        versions behind its scores, so that a run killed half-way names them too); runs
        left ``running`` by a killed process become ``interrupted``. Returns how many were."""
        interrupted = self._db.execute(
            "UPDATE runs SET outcome='interrupted' WHERE outcome='running'"
        ).rowcount
        self._db.execute(
            "INSERT INTO runs (run_id, seq, started_at, outcome, model_version, code_version) "
            "VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM runs), ?, 'running', ?, ?)",
            (run_id, started_at, model_version, code),
        )
        self.end_run(run_id, "running", facts or {})
        return interrupted

    def end_run(self, run_id: str, outcome: str, facts: dict[str, Any]) -> None:
        """Record how the run ended (``ok`` or ``failed``) and its figures (columns of
        :data:`RUN_COLUMNS`; others are ignored)."""
        known = {k: v for k, v in facts.items() if k in RUN_COLUMNS and k != "run_id"}
        assignments = ", ".join(f"{k}=?" for k in known)
        self._db.execute(
            f"UPDATE runs SET outcome=?{', ' if known else ''}{assignments} WHERE run_id=?",
            (outcome, *known.values(), run_id),
        )
        self.commit()

    def pending(
        self,
        records: Iterable[ImageRecord],
        run_id: str,
        keys: RowKeys,
        model_version: str,
        on_reused: Callable[[int], None] | None = None,
        holds: Callable[[list[tuple[str | bytes, int, int]]], set[str | bytes]] | None = None,
    ) -> Iterator[ImageRecord]:
        """The records that need the stages; the others are reused from the state.

        A record is reused when discovery left it pending and a row with the same path,
        size and mtime holds a final outcome (see :data:`RETRY_PREFIXES`) that
        :func:`decide` keeps; a row to rescore is kept only when `holds` (the input
        store's :meth:`~batchscan.scoring.input_store.InputStore.holds`, given (path, size, mtime)
        identities) says its input is stored. Kept rows are marked seen by this run (with
        the current keys and `model_version`, except those to rescore, which
        :meth:`to_rescore` finds by their old keys); `on_reused` gets their count per chunk.
        """
        for chunk in chunks(records, _CHUNK):
            yield from self._split(chunk, run_id, keys, model_version, on_reused, holds)

    def _split(
        self,
        chunk: list[ImageRecord],
        run_id: str,
        keys: RowKeys,
        model_version: str,
        on_reused: Callable[[int], None] | None,
        holds: Callable[[list[tuple[str | bytes, int, int]]], set[str | bytes]] | None,
    ) -> list[ImageRecord]:
        paths = [state_key(r.path) for r in chunk if r.pending]
        known: dict[str, tuple[int, int, str, str | None, str]] = {}
        if paths:
            marks = ",".join("?" * len(paths))
            for row in self._db.execute(
                f"SELECT path, size, mtime_ns, settings_key, reason, status FROM files "
                f"WHERE path IN ({marks})",
                paths,
            ):
                known[from_state(row[0])] = row[1:]
        current = str(keys)
        reused: list[str | bytes] = []
        rescore: list[tuple[ImageRecord, str | bytes]] = []
        todo: list[ImageRecord] = []
        for record in chunk:
            row = known.get(record.path)
            if row is not None and record.size < 0 and record.pending:
                # a PACS instance: its size is known once fetched; the row's stands for it
                record.size = row[0]
            if (
                not record.pending
                or row is None
                or row[:2] != (record.size, record.mtime_ns)
                or row[4] not in (SCORED, SKIPPED, FAILED)
                or _retry(row[3])
            ):
                todo.append(record)
                continue
            verdict = decide(row[2], row[4], row[3], keys)
            if verdict == REUSE:
                reused.append(state_key(record.path))
            elif verdict == RESCORE and holds is not None:
                rescore.append((record, state_key(record.path)))
            else:
                todo.append(record)
        if rescore and holds is not None:
            stored = holds([(key, r.size, r.mtime_ns) for r, key in rescore])
            todo += [r for r, key in rescore if key not in stored]
            rescore = [(r, key) for r, key in rescore if key in stored]
        if reused:
            self._db.executemany(
                "UPDATE files SET seen_run=?, settings_key=?, model_version=? WHERE path=?",
                [(run_id, current, model_version, p) for p in reused],
            )
        if rescore:
            self._db.executemany(
                "UPDATE files SET seen_run=? WHERE path=?", [(run_id, p) for _, p in rescore]
            )
        if (reused or rescore) and on_reused is not None:
            on_reused(len(reused) + len(rescore))
        self._maybe_commit()
        return todo

    def to_rescore(
        self, run_id: str, keys: RowKeys, root: str, chunk: int = 1024
    ) -> Iterator[list[ImageRecord]]:
        """The rows :meth:`pending` kept to rescore, as records rebuilt from their header
        facts (``abs_path`` under the archive `root`; outcome, score and OOD cleared),
        `chunk` at a time in path order. Saving them with the current keys takes them out
        of the next chunk, so a run killed half-way resumes where it was."""
        names = [c for c in IMAGE_COLUMNS if c != "model_version"]
        columns = ", ".join(f'"{c}"' for c in names)
        cleared = {"status", "reason", "detail", "score", "ood_score", "ood", "in_domain"}
        last: str | bytes | None = None
        while True:
            after = "" if last is None else "AND path > ?"
            rows = self._db.execute(
                f"SELECT {columns} FROM files WHERE seen_run=? AND settings_key != ? "
                f"AND (status=? OR reason LIKE ?) {after} ORDER BY path LIMIT ?",
                (
                    run_id,
                    str(keys),
                    SCORED,
                    DUPLICATE_PREFIX + "%",
                    *(() if last is None else (last,)),
                    chunk,
                ),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [_record_of(names, row, root, cleared) for row in rows]

    def save(
        self,
        records: Iterable[ImageRecord],
        run_id: str,
        keys: RowKeys | str,
        model_version: str,
    ) -> None:
        """Store finished records (replacing their old rows) and note what they touch."""
        rows, touched = [], set()
        for record in records:
            values = [_text(getattr(record, c)) for c in IMAGE_COLUMNS[:-1]]
            values[0] = state_key(record.path)
            rows.append((*values, model_version, record.score, str(keys), run_id))
            if record.study_instance_uid:
                touched.add(("study", record.study_instance_uid))
            if record.sop_instance_uid:
                touched.add(("sop", record.sop_instance_uid))
        old = self._uids_of([row[0] for row in rows])
        columns = ", ".join(f'"{c}"' for c in IMAGE_COLUMNS)
        marks = ",".join("?" * (len(IMAGE_COLUMNS) + 3))
        self._db.executemany(
            f"INSERT OR REPLACE INTO files ({columns}, model_score, settings_key, seen_run) "
            f"VALUES ({marks})",
            rows,
        )
        self._touch(touched | old)
        self._maybe_commit()

    def _uids_of(self, paths: list[str]) -> set[tuple[str, str]]:
        """The (kind, uid) pairs the current rows of `paths` belong to."""
        found: set[tuple[str, str]] = set()
        for part in chunks(paths, _CHUNK):
            marks = ",".join("?" * len(part))
            for study, sop in self._db.execute(
                f"SELECT study_instance_uid, sop_instance_uid FROM files WHERE path IN ({marks})",
                part,
            ):
                if study:
                    found.add(("study", study))
                if sop:
                    found.add(("sop", sop))
        return found

    def _touch(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._db.executemany("INSERT OR IGNORE INTO touched VALUES (?, ?)", list(pairs))

    def finish(
        self,
        run_id: str,
        aggregate: Callable[[pd.DataFrame], pd.DataFrame],
        study_chunk: int = 2000,
        on_removed: Callable[[list[str | bytes]], None] | None = None,
        covered: tuple[str | None, str | None] | None = None,
    ) -> Finished:
        """End of a complete run, in one transaction: drop vanished files, resolve duplicate
        SOP instances, re-aggregate the touched studies with `aggregate`.

        `aggregate` maps the image rows of some studies (columns of :data:`IMAGE_COLUMNS`)
        to their study rows (columns of :data:`STUDY_COLUMNS`). `on_removed` gets the
        stored paths of vanished files, in chunks, before their rows go (the input store
        prunes their entries). `covered`: the (first, last) ISO study dates a run over a
        PACS asked for (an end None: open); only the instances its query listed under
        those dates (:meth:`list_instances`) and did not list now are gone, every other
        row stays. None: the run saw the whole archive.
        """
        self.commit()
        gone, params = self._gone(run_id, covered)
        if on_removed is not None:
            for rows in self._fetch_chunks(f"SELECT path FROM files WHERE {gone}", params, _CHUNK):
                on_removed([row[0] for row in rows])
        self._touch(
            (kind, uid)
            for study, sop in self._db.execute(
                f"SELECT study_instance_uid, sop_instance_uid FROM files WHERE {gone}", params
            )
            for kind, uid in (("study", study), ("sop", sop))
            if uid
        )
        removed = self._db.execute(f"DELETE FROM files WHERE {gone}", params).rowcount
        self._db.execute(
            "DELETE FROM pacs_listed WHERE NOT EXISTS "
            "(SELECT 1 FROM files WHERE files.path = pacs_listed.path)"
        )
        self._resolve_duplicates()
        studies = [row[0] for row in self._db.execute("SELECT uid FROM touched WHERE kind='study'")]
        for part in chunks(studies, study_chunk):
            self._reaggregate(part, aggregate)
        self._db.execute("DELETE FROM touched")
        by_status: Counter[str] = Counter()
        by_reason: Counter[str] = Counter()
        for status, reason, n in self._db.execute(
            "SELECT status, reason, COUNT(*) FROM files GROUP BY status, reason"
        ):
            by_status[status] += n
            if reason:
                by_reason[reason] += n
        seen = self._db.execute("SELECT COUNT(*) FROM files WHERE seen_run = ?", (run_id,))
        self.commit()
        return Finished(
            removed=removed,
            by_status=by_status,
            by_reason=by_reason,
            files=sum(by_status.values()),
            seen=int(seen.fetchone()[0]),
        )

    @staticmethod
    def _gone(
        run_id: str, covered: tuple[str | None, str | None] | None
    ) -> tuple[str, tuple[Any, ...]]:
        """The SQL condition (and its parameters) of the file rows that vanished: not seen
        by `run_id`, and within the dates it `covered` (:meth:`finish`)."""
        if covered is None:
            return "seen_run != ?", (run_id,)
        first, last = covered
        return (
            "seen_run != ? AND path IN (SELECT path FROM pacs_listed WHERE study_date "
            "IS NOT NULL AND (? IS NULL OR study_date >= ?) AND (? IS NULL OR study_date <= ?))",
            (run_id, first, first, last, last),
        )

    # -- a PACS as the archive ---------------------------------------------------------

    def list_instances(self, listed: Iterable[tuple[str, str | None]]) -> None:
        """Note the (path, ISO study date) of instances a PACS's query returned this run:
        the date under which :meth:`finish` counts them within a window."""
        self._db.executemany(
            "INSERT OR REPLACE INTO pacs_listed (path, study_date) VALUES (?, ?)", list(listed)
        )
        self._maybe_commit()

    def high_water(self, source: str) -> tuple[str, int] | None:
        """The high-water mark (ISO date) of the PACS named `source` and the late-arrival
        margin in days of the run that set it, or None before its first complete run."""
        row = self._db.execute(
            "SELECT high_water, margin_days FROM pacs_marks WHERE source = ?", (source,)
        ).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    def set_high_water(self, source: str, mark: str, margin_days: int, run_id: str) -> None:
        """Record the high-water mark of a PACS after a complete run, and commit."""
        self._db.execute(
            "INSERT OR REPLACE INTO pacs_marks (source, high_water, margin_days, run_id) "
            "VALUES (?, ?, ?, ?)",
            (source, mark, margin_days, run_id),
        )
        self.commit()

    def _resolve_duplicates(self) -> None:
        """One scored row per SOP Instance UID: the smallest path wins (stable across runs
        and worker order); the others are ``skipped: duplicate_of:<path>`` but keep their
        model score, so that if the winner disappears the next one takes over unread."""
        sops = [row[0] for row in self._db.execute("SELECT uid FROM touched WHERE kind='sop'")]
        for part in chunks(sops, _CHUNK):
            marks = ",".join("?" * len(part))
            rows = self._db.execute(
                f"SELECT sop_instance_uid, path, study_instance_uid FROM files "
                f"WHERE sop_instance_uid IN ({marks}) AND (status=? OR reason LIKE ?) "
                f"ORDER BY sop_instance_uid, path",
                (*part, SCORED, DUPLICATE_PREFIX + "%"),
            ).fetchall()
            winner: dict[str, str] = {}
            for sop, path, study in rows:
                if sop not in winner:
                    winner[sop] = path
                    self._db.execute(
                        "UPDATE files SET status=?, reason=NULL, detail=NULL, score=model_score "
                        "WHERE path=?",
                        (SCORED, path),
                    )
                else:
                    self._db.execute(
                        "UPDATE files SET status=?, reason=?, detail=?, score=NULL WHERE path=?",
                        (
                            SKIPPED,
                            DUPLICATE_PREFIX + readable(from_state(winner[sop])),
                            "same SOP Instance UID as another file; scored once",
                            path,
                        ),
                    )
                if study:
                    self._touch([("study", study)])

    def _reaggregate(
        self, studies: list[str], aggregate: Callable[[pd.DataFrame], pd.DataFrame]
    ) -> None:
        marks = ",".join("?" * len(studies))
        images = pd.read_sql_query(
            f"SELECT * FROM files WHERE study_instance_uid IN ({marks})", self._db, params=studies
        )
        self._db.execute(f"DELETE FROM studies WHERE study_instance_uid IN ({marks})", studies)
        rows = aggregate(images)
        if len(rows):
            frame = rows[list(STUDY_COLUMNS)].astype(object).where(rows.notna(), None)
            names = ", ".join(f'"{c}"' for c in STUDY_COLUMNS)
            self._db.executemany(
                f"INSERT INTO studies ({names}) VALUES ({','.join('?' * len(STUDY_COLUMNS))})",
                [
                    tuple(v.item() if hasattr(v, "item") else v for v in row)
                    for row in frame.itertuples(index=False)
                ],
            )

    # -- reading back ------------------------------------------------------------------

    def image_rows(self, chunk: int = 8192) -> Iterator[dict[str, list[Any]]]:
        """Every file row, by path, as column lists of `chunk` rows (report order).

        ``path`` comes as :func:`batchscan.ingest.paths.readable` text, with the exact bytes of
        names that are not UTF-8 in an added ``path_bytes`` column (None for the others).
        """
        for part in self._columns("files", IMAGE_COLUMNS, "path", chunk):
            stored = part["path"]
            part["path_bytes"] = [v if isinstance(v, bytes) else None for v in stored]
            part["path"] = [readable(from_state(v)) for v in stored]
            part["shadow_score"] = [  # a duplicate keeps it, as its model score, unreported
                v if status == SCORED else None
                for v, status in zip(part["shadow_score"], part["status"], strict=True)
            ]
            for name in _BOOL_COLUMNS:
                part[name] = [None if v is None else bool(v) for v in part[name]]
            yield part

    def study_rows(self, chunk: int = 8192) -> Iterator[dict[str, list[Any]]]:
        """Every study row, by study UID, as column lists."""
        for part in self._columns("studies", STUDY_COLUMNS, "study_instance_uid", chunk):
            for name in _BOOL_COLUMNS:
                if name in part:
                    part[name] = [None if v is None else bool(v) for v in part[name]]
            yield part

    def scored_file_facts(
        self, columns: tuple[str, ...], chunk: int = 8192
    ) -> Iterator[dict[str, list[Any]]]:
        """`columns` (of :data:`IMAGE_COLUMNS`) of every scored file, by path, as column
        lists; ``path`` comes as stored (the key of the model-input store), not made
        readable. What the drift monitor reads (:mod:`batchscan.site.drift`).

        Raises
        ------
        ValueError
            If a column is not one of :data:`IMAGE_COLUMNS`.
        """
        names = ", ".join(f'"{c}"' for c in _known(columns, IMAGE_COLUMNS, "file"))
        sql = f"SELECT {names} FROM files WHERE status=? ORDER BY path"
        for rows in self._fetch_chunks(sql, (SCORED,), chunk):
            yield {name: [row[i] for row in rows] for i, name in enumerate(columns)}

    def study_facts(
        self, columns: tuple[str, ...], chunk: int = 8192
    ) -> Iterator[dict[str, list[Any]]]:
        """`columns` (of :data:`STUDY_COLUMNS`) of every study row, as column lists (a
        narrow read where :meth:`study_rows` reads them all).

        Raises
        ------
        ValueError
            If a column is not one of :data:`STUDY_COLUMNS`.
        """
        columns = _known(columns, STUDY_COLUMNS, "study")
        yield from self._columns("studies", columns, "study_instance_uid", chunk)

    def run_rows(self) -> dict[str, list[Any]]:
        """The run history, oldest first."""
        merged: dict[str, list[Any]] = {c: [] for c in RUN_COLUMNS}
        for part in self._columns("runs", RUN_COLUMNS, "seq", 8192):
            for name, values in part.items():
                merged[name] += values
        return merged

    def _columns(
        self, table: str, columns: tuple[str, ...], order: str, chunk: int
    ) -> Iterator[dict[str, list[Any]]]:
        names = ", ".join(f'"{c}"' for c in columns)
        for rows in self._fetch_chunks(f"SELECT {names} FROM {table} ORDER BY {order}", (), chunk):
            yield {name: [row[i] for row in rows] for i, name in enumerate(columns)}

    def _fetch_chunks(
        self, sql: str, params: tuple[Any, ...], chunk: int
    ) -> Iterator[list[tuple[Any, ...]]]:
        cursor = self._db.cursor()
        cursor.execute(sql, params)
        while rows := cursor.fetchmany(chunk):
            yield rows

    def study_counts(self) -> dict[str, int]:
        """Scored studies in the state: ``studies``, ``studies_flagged``, and by training
        domain ``studies_in_domain``, ``studies_out_of_domain``, ``studies_domain_unknown``."""
        row = self._db.execute(
            "SELECT COUNT(*), SUM(flag), SUM(in_domain = 1), SUM(in_domain = 0), "
            "SUM(in_domain IS NULL) FROM studies"
        ).fetchone()
        return {name: int(value or 0) for name, value in zip(RUN_STUDY_COUNTS, row, strict=True)}

    def any_row_keys(self) -> str | None:
        """The keys one file row was stored under (``settings_key``), or None in an empty
        state: what a state made before runs recorded their ``row_keys`` was made under."""
        row = self._db.execute("SELECT settings_key FROM files LIMIT 1").fetchone()
        return row[0] if row else None

    def file_identity(self, stored_path: str | bytes) -> tuple[int, int] | None:
        """(size, mtime_ns) of a file's row by its stored path (:func:`state_key`), or None:
        what the input store keys that file's input by."""
        row = self._db.execute(
            "SELECT size, mtime_ns FROM files WHERE path = ?", (stored_path,)
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def study_scores(self, chunk: int = 8192) -> Iterator[StudyScore]:
        """Every study's score and flag with its accession number and study date, `chunk`
        rows at a time (monitoring joins them to the report labels)."""
        for rows in self._fetch_chunks(
            "SELECT study_instance_uid, accession_number, study_date, score, flag FROM studies",
            (),
            chunk,
        ):
            yield from map(StudyScore._make, rows)

    def scored_study_images(self, chunk: int = 8192) -> Iterator[StudyImage]:
        """Every scored image that has a SOP Instance UID, with its study's outcome, ordered
        by study and then SOP Instance UID, `chunk` rows at a time (the SR stage groups
        them into one SR per study)."""
        for rows in self._fetch_chunks(_STUDY_IMAGES_SQL, (SCORED,), chunk):
            yield from map(StudyImage._make, rows)

    # -- what report.html draws (aggregates computed in SQL, so that a page of ten
    #    million files never loads them into Python) ------------------------------------

    def study_score_bins(self, by: str, bins: int) -> list[tuple[Any, int, int]]:
        """Studies counted by (value of the study column `by`, score bin of `bins` equal
        bins over [0, 1])."""
        column = _study_column(by)
        return self._db.execute(
            f"SELECT {column}, {_bin(bins)} AS b, COUNT(*) FROM studies GROUP BY 1, 2"
        ).fetchall()

    def study_groups(
        self, by: str, top: int, bins: int
    ) -> tuple[list[StudyGroup], list[tuple[str, int, int]]]:
        """The `top` largest groups of studies by `by` (one of :data:`STUDY_GROUPS`), most
        studies first, and their studies counted by (group, score bin of `bins`)."""
        expression = STUDY_GROUPS[by]
        totals = self._rows(
            StudyGroup,
            f"SELECT {expression} AS g, COUNT(*), AVG(score), AVG(flag) FROM studies "
            "GROUP BY g ORDER BY 2 DESC, 1 LIMIT ?",
            (top,),
        )
        names = tuple(group.group for group in totals)
        if not names:
            return totals, []
        marks = ",".join("?" * len(names))
        counts = self._db.execute(
            f"SELECT {expression} AS g, {_bin(bins)}, COUNT(*) FROM studies "
            f"WHERE {expression} IN ({marks}) GROUP BY 1, 2",
            names,
        ).fetchall()
        return totals, counts

    def recent_runs(self, limit: int) -> list[RunLine]:
        """The last `limit` runs, newest first."""
        return self._rows(
            RunLine,
            "SELECT run_id, replace(substr(started_at, 1, 16), 'T', ' '), outcome, "
            "files_found, files_processed, scored, skipped, failed, studies, "
            "studies_flagged, images_per_second, seconds, model_version "
            "FROM runs ORDER BY seq DESC LIMIT ?",
            (limit,),
        )

    def studies_per_week(self, weeks: int) -> list[tuple[str, int, int | None]]:
        """(Monday of the week of study date, studies, flagged) of the last `weeks` weeks
        that have studies, oldest first."""
        return self._db.execute(
            "SELECT date(study_date, '-6 days', 'weekday 1') AS week, COUNT(*), SUM(flag) "
            "FROM studies WHERE study_date IS NOT NULL GROUP BY week ORDER BY week DESC "
            "LIMIT ?",
            (weeks,),
        ).fetchall()[::-1]

    def undated_studies(self) -> int:
        """Studies without a valid study date."""
        return int(
            self._db.execute("SELECT COUNT(*) FROM studies WHERE study_date IS NULL").fetchone()[0]
        )

    def top_flagged_studies(self, limit: int) -> list[FlaggedStudy]:
        """The `limit` flagged studies of highest score (ties by study UID)."""
        return self._rows(
            FlaggedStudy,
            "SELECT study_instance_uid, accession_number, study_date, score, views, "
            "in_domain FROM studies WHERE flag = 1 ORDER BY score DESC, "
            "study_instance_uid LIMIT ?",
            (limit,),
        )

    def top_scored_images(self, study_instance_uid: str, limit: int) -> list[ShownImage]:
        """The `limit` scored images of a study of highest score (ties by path)."""
        return self._rows(
            ShownImage,
            "SELECT path, score, view, NULL FROM files WHERE study_instance_uid = ? AND "
            "status = ? ORDER BY score DESC, path LIMIT ?",
            (study_instance_uid, SCORED, limit),
        )

    def random_scored_images(self, one_in: int, limit: int) -> list[ShownImage]:
        """At most `limit` scored images drawn at random, about one in `one_in` of them, in
        one pass that stops at `limit` (a new draw every call)."""
        return self._rows(
            ShownImage,
            "SELECT path, score, view, accession_number FROM files WHERE status = ? "
            "AND abs(random()) % ? = 0 LIMIT ?",
            (SCORED, one_in, limit),
        )

    def _rows(self, row: type[_Row], sql: str, params: tuple[Any, ...]) -> list[_Row]:
        """Every row of a query, as `row` named tuples."""
        return [row._make(values) for values in self._db.execute(sql, params)]

    # -- transactions ------------------------------------------------------------------

    def _maybe_commit(self) -> None:
        if time.monotonic() - self._last_commit >= self.checkpoint_seconds:
            self.commit()

    def commit(self) -> None:
        """Commit what is stored so far (a checkpoint) and open the next transaction."""
        if self.on_commit is not None:  # first: a row committed has its input committed
            self.on_commit()
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")
        self._last_commit = time.monotonic()

    def close(self) -> None:
        """Roll back anything uncommitted (a run that failed keeps its last checkpoint)."""
        with contextlib.suppress(sqlite3.OperationalError):
            self._db.execute("ROLLBACK")
        self._db.close()
