"""The one way a SQLite store of batchscan is opened.

batchscan keeps four stores: the state (:mod:`batchscan.results.state`), the model-input
store (:mod:`batchscan.scoring.input_store`), the SR outbox (:mod:`batchscan.pacs.outbox`)
and the report-label cache (:mod:`batchscan.site.label_cache`). Each owns its tables and
its SQL; what they share is here, once:

* **WAL journal**: a reader (``batchscan train`` reading a scan's state, ``send`` reading
  the outbox while a scan writes it) never blocks the writer, and a ``kill -9`` loses at most
  what was not yet committed;
* **a schema version row** in the store's ``meta`` table: a database of the version this
  batchscan reads is used; an older one is upgraded when the store declares the steps
  (:attr:`Schema.upgrades`), in one transaction; anything else is refused with
  :class:`OtherVersionError`, never read as if it were the current layout;
* **private files**: the database, its WAL and its shared memory lose the group-write and
  "other" bits (:func:`batchscan.storage.files.make_private`), also when an older release
  left them 0644;
* **a busy timeout**, and **read-only opening** (:func:`open_readonly`) for a process that
  reads another's store and must never create, change or delete it.

What a store does when its database cannot be used is its own policy, the `on_damage`
parameter of :func:`open_store`: the state and the outbox hold the only record of what was
done, so they :attr:`OnDamage.REFUSE` (the caller stops with one line); the input store is a
cache of what the archive gives again, so it may :attr:`OnDamage.START_AFRESH`. Either way a
store that is sound but cannot be used *now* (locked, a full disk, an I/O error:
:class:`UnavailableError`) is never deleted.
"""

from __future__ import annotations

import contextlib
import enum
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from batchscan.storage.files import make_private

#: Seconds a statement waits for another connection's lock before it fails
#: (:class:`UnavailableError`); SQLite's own default.
BUSY_TIMEOUT: Final = 5.0

_META: Final = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


class StoreError(Exception):
    """A store's database cannot be used (the message says why; `path` names it)."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


class UnavailableError(StoreError):
    """Sound as far as can be told, but not usable now: missing (read-only opening), locked,
    a full disk, an I/O error, a read-only folder."""


class DamagedError(StoreError):
    """Not a database, truncated or corrupt: another program's file, or a damaged one."""


class OtherVersionError(StoreError):
    """A schema version this batchscan does not read and cannot upgrade from."""

    def __init__(self, path: Path, found: str, wanted: int) -> None:
        super().__init__(path, f"schema version {found}, this batchscan reads {wanted}")
        self.found = found
        self.wanted = wanted


class OnDamage(enum.Enum):
    """What :func:`open_store` does with a database that is :class:`DamagedError` or of
    :class:`OtherVersionError`."""

    #: Raise: the store holds the only record of what was done (the state, the outbox).
    REFUSE = "refuse"
    #: Delete its files and make an empty store: a cache of what can be made again.
    START_AFRESH = "start afresh"


@dataclass(frozen=True, slots=True)
class Schema:
    """A store's tables and their version.

    Attributes
    ----------
    version:
        The version this batchscan reads and writes.
    script:
        The ``CREATE ... IF NOT EXISTS`` statements of the store's tables and indexes (run
        on every writable opening, so a table a later release adds appears by itself).
    version_key:
        The key of the version row in ``meta`` (stores made before this module keep theirs).
    upgrades:
        ``upgrades[n]`` takes a database of version ``n`` to ``n + 1`` with
        ``connection.execute`` statements; run in one transaction with the new version row.
    page_size:
        The page size of a new database (an existing one keeps its own).
    """

    version: int
    script: str
    version_key: str = "schema_version"
    upgrades: Mapping[int, Callable[[sqlite3.Connection], None]] = field(default_factory=dict)
    page_size: int | None = None


def sqlite_files(path: Path) -> tuple[Path, Path, Path]:
    """A SQLite database's files on disk in WAL mode: the database, its WAL and its shared
    memory (each to be made private, or removed, together)."""
    return path, Path(f"{path}-wal"), Path(f"{path}-shm")


def remove(path: Path) -> None:
    """Delete a store's files (database, WAL, shared memory); missing ones are no error."""
    for made in sqlite_files(path):
        made.unlink(missing_ok=True)


def open_store(
    path: Path,
    schema: Schema,
    *,
    on_damage: OnDamage,
    synchronous: str = "NORMAL",
    busy_timeout: float = BUSY_TIMEOUT,
    on_afresh: Callable[[StoreError], None] | None = None,
) -> sqlite3.Connection:
    """Open (or create) the store at `path` for reading and writing, in autocommit mode
    (the store begins its own transactions).

    Parameters
    ----------
    on_damage:
        The store's policy for a damaged database or another version (:class:`OnDamage`).
    synchronous:
        SQLite's ``synchronous`` setting: ``NORMAL`` (a commit may be lost on a power cut,
        never the database) or ``FULL`` (a commit is on disk when it returns).
    on_afresh:
        Told why, before a damaged store is deleted under :attr:`OnDamage.START_AFRESH`.

    Raises
    ------
    UnavailableError
        The database cannot be used now (it is kept).
    DamagedError, OtherVersionError
        Under :attr:`OnDamage.REFUSE`; under :attr:`OnDamage.START_AFRESH` only when even an
        empty store cannot be made.
    """
    try:
        return _open(path, schema, synchronous, busy_timeout)
    except (DamagedError, OtherVersionError) as exc:
        if on_damage is OnDamage.REFUSE:
            raise
        if on_afresh is not None:
            on_afresh(exc)
    remove(path)
    return _open(path, schema, synchronous, busy_timeout)


def open_readonly(
    path: Path, schema: Schema | None = None, *, busy_timeout: float = BUSY_TIMEOUT
) -> sqlite3.Connection:
    """Open another process's store read-only: nothing is created, written or deleted.
    With `schema`, a database of another version is refused (one without a version row is
    read as it is).

    Raises
    ------
    UnavailableError
        No database at `path`, or it cannot be read now.
    DamagedError, OtherVersionError
        Not a store of this batchscan.
    """
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=busy_timeout)
    except sqlite3.Error as exc:
        raise _error(path, exc) from exc
    try:
        if schema is not None:
            found = _found_version(db, schema)
            if found is not None and found != str(schema.version):
                raise OtherVersionError(path, found, schema.version)
    except BaseException as exc:
        db.close()
        if isinstance(exc, sqlite3.Error):
            raise _error(path, exc) from exc
        raise
    return db


def _open(path: Path, schema: Schema, synchronous: str, busy_timeout: float) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout)
    except sqlite3.Error as exc:
        raise _error(path, exc) from exc
    try:
        if schema.page_size is not None:  # takes only on a new database, before WAL
            db.execute(f"PRAGMA page_size={int(schema.page_size)}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={_synchronous(synchronous)}")
        db.execute(_META)
        found = _found_version(db, schema)
        if found is not None and found != str(schema.version):
            _upgrade(db, path, schema, found)
        db.executescript(schema.script)
        if found is None:
            db.execute("INSERT INTO meta VALUES (?, ?)", (schema.version_key, str(schema.version)))
    except BaseException as exc:
        db.close()
        if isinstance(exc, sqlite3.Error):
            raise _error(path, exc) from exc
        raise
    for made in sqlite_files(path):
        make_private(made)
    return db


def _found_version(db: sqlite3.Connection, schema: Schema) -> str | None:
    try:
        row = db.execute("SELECT value FROM meta WHERE key=?", (schema.version_key,)).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # read-only, and a store that never had one
            return None
        raise
    return None if row is None else str(row[0])


def _upgrade(db: sqlite3.Connection, path: Path, schema: Schema, found: str) -> None:
    """Take the database from version `found` to the schema's, step by step in one
    transaction, or refuse."""
    try:
        start = int(found)
    except ValueError:
        raise OtherVersionError(path, found, schema.version) from None
    steps = range(start, schema.version)
    if not steps or any(n not in schema.upgrades for n in steps):
        raise OtherVersionError(path, found, schema.version)
    db.execute("BEGIN IMMEDIATE")
    try:
        for n in steps:
            schema.upgrades[n](db)
        db.execute("UPDATE meta SET value=? WHERE key=?", (str(schema.version), schema.version_key))
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def _synchronous(setting: str) -> str:
    if setting not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"no synchronous setting {setting!r}")
    return setting


def _error(path: Path, exc: sqlite3.Error) -> StoreError:
    """The store error of a SQLite error: OperationalError (locked, full, I/O, cannot open)
    says nothing about the database itself; any other DatabaseError says it is damaged."""
    if isinstance(exc, sqlite3.OperationalError) or not isinstance(exc, sqlite3.DatabaseError):
        return UnavailableError(path, str(exc))
    return DamagedError(path, str(exc))
