"""The model-input store: the 64 x 64 input of every scored image, kept in REPORT_DIR.

Why: a model's whole view of a file is its 64 x 64 input; the archive holds the same film at
2048 px or more, in a codec that costs milliseconds to decode. A new model, a shadow model
or a training job that starts from the stored inputs scores a million films in minutes
without opening the archive, where a re-read would cost hours of decode and terabytes of
I/O.

What an entry holds and when it is used: the input of one file, keyed by the file's
identity (its state key, size and mtime) and the *input key* (the options and versions
that make an input, :func:`batchscan.results.keys.input_key`). An entry is used only when all
four match the file as discovery sees it now; anything else is a miss, and a miss means
the file is read again, never a crash or a score from another picture.

Encoding: the three channels of an input are the same grey picture
(:data:`batchscan.ingest.preprocess.CHANNELS`), so one is kept, as 16-bit levels of [0, 1],
deflated (:func:`encode`; the level step 1.5e-5 moves a score by far less than the 1e-4
the store promises, tested). Each entry carries a CRC-32 of its bytes: a flipped bit is a
miss.

Crash safety: SQLite in WAL mode (opened by :func:`batchscan.storage.sqlite.open_store`),
committed with the state's checkpoints; a run killed with SIGKILL loses at most the entries
since the last checkpoint (those files are read again). A store that cannot be opened or
read (truncated, overwritten, another program's file) is deleted and started afresh with a
warning (its failure policy, :attr:`~batchscan.storage.sqlite.OnDamage.START_AFRESH`): it
is a cache of the archive, and holds pictures of patients, so it is written 0640 like every
file and never copied aside.

Beside the inputs, the store keeps what the drift monitor (:mod:`batchscan.site.drift`)
derives from a sample of them (a few statistics of the picture and the model's penultimate
features, float32), under the same identity and input key and the key of the model that made
them, so that each is made once and a nightly run makes only the new ones; a file that
changes or vanishes takes its derived vector with it.

The store sits beside the state and knows nothing of scoring; the engines hand it inputs
and the rescoring stage (:mod:`batchscan.scoring.rescore`) reads them back.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import numpy as np

from batchscan.ingest.preprocess import CHANNELS, INPUT_SIZE
from batchscan.ingest.records import chunks
from batchscan.storage.sqlite import (
    OnDamage,
    OtherVersionError,
    Schema,
    StoreError,
    UnavailableError,
    open_readonly,
    open_store,
    remove,
    sqlite_files,
)

log = logging.getLogger("batchscan")

STORE_FILE: Final = "inputs.sqlite"
#: Version of the store's layout, kept in the row stores have always had (``encoding``):
#: 1, the entries and their encoding (not the inputs: that is the input key's business);
#: 2 adds the ``derived`` table, by an upgrade in place (:data:`SCHEMA`), so that a store
#: of version 1 keeps its entries.
VERSION: Final = 2
#: Quantization levels of [0, 1] (16 bits).
LEVELS: Final = 65535
#: Bytes of one input's levels before deflation.
LEVEL_BYTES: Final = INPUT_SIZE * INPUT_SIZE * 2
#: zlib's fastest level: its entries are within 2 % of level 9's (measured) at a third of
#: the time, which the scan's main process spends beside inference.
ZLIB_LEVEL: Final = 1
_CHUNK: Final = 500

#: What the drift monitor derived from an input (:meth:`InputStore.put_derived`), since
#: version 2.
_DERIVED: Final = """
CREATE TABLE IF NOT EXISTS derived (
    path NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    input_key TEXT NOT NULL,
    model_key TEXT NOT NULL,
    crc INTEGER NOT NULL,
    data BLOB NOT NULL
);
"""
_TABLES: Final = (
    """
CREATE TABLE IF NOT EXISTS inputs (
    path NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    input_key TEXT NOT NULL,
    crc INTEGER NOT NULL,
    data BLOB NOT NULL
);
"""
    + _DERIVED
)
#: Database page size: a rowid table keeps a row of up to a page less 35 bytes on its page,
#: so with 32 KiB pages about four 8 KB entries share one and no entry spills into an
#: overflow page of its own (with SQLite's default 4 KiB pages an entry took three pages,
#: 12 KiB; measured).
PAGE_SIZE: Final = 32768

#: Older versions whose entries a read-only reader reads as they are (it never reads
#: ``derived``); a scan upgrades them.
_READS_AS_IS: Final = ("1",)


def _add_derived(db: sqlite3.Connection) -> None:
    """Version 1 to 2: the ``derived`` table beside the entries, which stay."""
    db.execute(_DERIVED)


#: The store's tables and their version (:mod:`batchscan.storage.sqlite`).
SCHEMA: Final = Schema(
    version=VERSION,
    script=_TABLES,
    version_key="encoding",
    upgrades={1: _add_derived},
    page_size=PAGE_SIZE,
)

#: A file's identity as the store keys it: (state key, size, mtime_ns).
Identity = tuple[str | bytes, int, int]


def encode(model_input: np.ndarray) -> bytes:
    """The stored bytes of one (64, 64, 3) model input: its first channel as 16-bit levels,
    each row as differences from its left neighbour, high and low bytes apart, deflated
    (PNG's idea: neighbouring levels are close, so their differences compress; about 6 KB
    an entry on radiographs, measured, against 8 KB plain).

    Raises
    ------
    ValueError
        If the input is not a (64, 64, 3) picture with three equal channels.
    """
    if model_input.shape != (INPUT_SIZE, INPUT_SIZE, CHANNELS):
        raise ValueError(f"expected a (64, 64, 3) model input, got {model_input.shape}")
    grey = model_input[..., 0]
    if not all(np.array_equal(grey, model_input[..., c]) for c in range(1, CHANNELS)):
        raise ValueError("the channels of a model input differ")
    levels = np.rint(np.clip(grey, 0.0, 1.0) * LEVELS).astype("<u2")
    steps = np.diff(levels, axis=1, prepend=np.zeros((INPUT_SIZE, 1), "<u2"))  # wraps mod 2**16
    return zlib.compress(steps.view(np.uint8).reshape(-1, 2).T.tobytes(), ZLIB_LEVEL)


def decode(data: bytes) -> np.ndarray:
    """The (64, 64, 3) float32 model input of :func:`encode`'s bytes.

    Raises
    ------
    ValueError
        If the bytes are not an encoded input.
    """
    try:
        raw = zlib.decompress(data)
    except zlib.error as exc:
        raise ValueError(f"not an encoded input: {exc}") from None
    if len(raw) != LEVEL_BYTES:
        raise ValueError(f"an entry of {len(raw)} bytes, expected {LEVEL_BYTES}")
    steps = np.frombuffer(raw, np.uint8).reshape(2, -1).T.copy().view("<u2")
    levels = np.cumsum(steps.reshape(INPUT_SIZE, INPUT_SIZE), axis=1, dtype="<u2")
    grey = levels.astype(np.float32) / np.float32(LEVELS)
    return np.repeat(grey[..., None], CHANNELS, axis=2)


class InputStore:
    """The input store of one REPORT_DIR (opened with its lock held, beside the state).

    Every method survives a damaged database: the store is then emptied (the file deleted
    and made afresh) and the call answers as for an empty store, so the files concerned
    are read again.

    Parameters
    ----------
    path:
        The SQLite file; created when missing.
    readonly:
        Read another process's store (``batchscan train`` reading a scan's): nothing is
        created, written or reset; a store that cannot be read answers as an empty one.
    """

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._db: sqlite3.Connection | None = None
        self.resets = 0
        try:
            self._open()
        except (StoreError, sqlite3.DatabaseError) as exc:
            self._reset(exc)

    # -- lifecycle ---------------------------------------------------------------------

    def _open(self) -> None:
        if self.readonly:
            try:
                self._db = open_readonly(self.path, SCHEMA)
            except OtherVersionError as exc:  # adapt or train before the next scan upgraded it
                if exc.found not in _READS_AS_IS:
                    raise
                self._db = open_readonly(self.path)
            return
        db = open_store(self.path, SCHEMA, on_damage=OnDamage.START_AFRESH, on_afresh=self._afresh)
        try:
            db.execute("SELECT COUNT(*) FROM inputs").fetchone()  # a truncated file fails here
            db.execute("BEGIN")
        except BaseException:
            db.close()
            raise
        self._db = db

    def files(self) -> tuple[Path, Path, Path]:
        """The store's files on disk (database, WAL, shared memory)."""
        return sqlite_files(self.path)

    def _close_quietly(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = None

    def _afresh(self, exc: BaseException) -> None:
        """Say that the store is deleted and started afresh (its files will be read
        again)."""
        self.resets += 1
        log.warning(
            "input store %s cannot be used (%s): started afresh; the files it held are "
            "read from the archive again",
            self.path,
            exc,
        )

    def _reset(self, exc: BaseException) -> None:
        """Delete a store that is damaged and start an empty one (its files will be read
        again). A store that is sound but cannot be used now (disk full, locked, an I/O
        error: SQLite's OperationalError) is kept and left alone for the rest of the run, as
        is a read-only one: a full disk tonight must not cost the whole store."""
        self._close_quietly()
        if self.readonly or isinstance(exc, sqlite3.OperationalError | UnavailableError):
            self.resets += 1
            log.warning(
                "input store %s cannot be used now (%s): kept, and not used for the rest of "
                "this run (its files are read)",
                self.path,
                exc,
            )
            return
        self._afresh(exc)
        remove(self.path)
        try:
            self._open()
        except (StoreError, sqlite3.DatabaseError) as again:  # e.g. REPORT_DIR's disk is failing
            log.warning("input store %s cannot be made (%s): runs without one", self.path, again)
            self._db = None

    def commit(self) -> None:
        """Commit what was put so far (called with the state's checkpoints)."""
        if self._db is None or self.readonly:
            return
        try:
            self._db.execute("COMMIT")
            self._db.execute("BEGIN")
        except sqlite3.DatabaseError as exc:
            self._reset(exc)

    def close(self) -> None:
        """Commit and close."""
        self.commit()
        if self._db is not None:
            if not self.readonly:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("COMMIT")
            self._db.close()
            self._db = None

    # -- entries -----------------------------------------------------------------------

    def put(self, entries: Iterable[tuple[Identity, str, np.ndarray]]) -> None:
        """Store (identity, input key, model input) entries, replacing a path's old one."""
        if self._db is None:  # none this run: nothing to encode for
            return
        rows = []
        for (path, size, mtime_ns), input_key, model_input in entries:
            data = encode(model_input)
            rows.append((path, size, mtime_ns, input_key, zlib.crc32(data), data))
        if rows:
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO inputs (path, size, mtime_ns, input_key, crc, data) "
                    "VALUES (?,?,?,?,?,?)",
                    rows,
                )
            except sqlite3.DatabaseError as exc:
                self._reset(exc)

    def delete(self, paths: Iterable[str | bytes]) -> None:
        """Drop the entries of `paths` (files that vanished, or no longer give an input),
        and what was derived from them."""
        if self._db is None:
            return
        try:
            for part in chunks(paths, _CHUNK):
                marks = ",".join("?" * len(part))
                for table in ("inputs", "derived"):
                    self._db.execute(f"DELETE FROM {table} WHERE path IN ({marks})", part)
        except sqlite3.DatabaseError as exc:
            self._reset(exc)

    def _entries(
        self, columns: str, paths: Iterable[str | bytes], table: str = "inputs"
    ) -> Iterator[tuple[Any, ...]]:
        """``path, size, mtime_ns, input_key`` and `columns` of the entries of `paths`
        (in ``inputs``, or in ``derived``).

        Raises
        ------
        sqlite3.DatabaseError
            The store cannot be read (the caller resets it).
        """
        assert self._db is not None
        for part in chunks(paths, _CHUNK):
            marks = ",".join("?" * len(part))
            yield from self._db.execute(
                f"SELECT path, size, mtime_ns, input_key, {columns} FROM {table} "
                f"WHERE path IN ({marks})",
                part,
            )

    def holds(self, identities: list[Identity], input_key: str) -> set[str | bytes]:
        """The paths of `identities` with an entry of the same size, mtime and input key
        (the checksum is checked when the entry is read)."""
        if self._db is None:
            return set()
        wanted = {path: (size, mtime) for path, size, mtime in identities}
        try:
            return {
                path
                for path, size, mtime, key, length in self._entries("length(data)", wanted)
                if wanted.get(path) == (size, mtime) and key == input_key and length
            }
        except sqlite3.DatabaseError as exc:
            self._reset(exc)
            return set()

    def get(self, identities: list[Identity], input_key: str) -> dict[str | bytes, np.ndarray]:
        """The model inputs of those `identities` with a sound matching entry, by path.

        A damaged entry (checksum or encoding) is left out and deleted; one made for
        another file or input key is only left out.
        """
        if self._db is None:
            return {}
        wanted = {path: (size, mtime) for path, size, mtime in identities}
        found: dict[str | bytes, np.ndarray] = {}
        bad: list[str | bytes] = []
        try:
            for path, size, mtime, key, crc, data in self._entries("crc, data", wanted):
                model_input = None
                if isinstance(data, bytes) and zlib.crc32(data) == crc:
                    with contextlib.suppress(ValueError):
                        model_input = decode(data)
                if model_input is None:
                    bad.append(path)
                elif wanted.get(path) == (size, mtime) and key == input_key:
                    found[path] = model_input
        except sqlite3.DatabaseError as exc:
            self._reset(exc)
            return {}
        if bad:
            log.warning("input store %s: %d damaged entries, read again", self.path, len(bad))
            if not self.readonly:
                self.delete(bad)
        return found

    # -- what was derived from the entries ---------------------------------------------

    def put_derived(self, entries: Iterable[tuple[Identity, str, str, np.ndarray]]) -> None:
        """Keep (identity, input key, model key, vector) entries: a vector of float32 made
        from a file's input by a model (the drift monitor's image statistics and features,
        :mod:`batchscan.site.drift`), so that each is made once. Replaces a path's old one."""
        if self._db is None or self.readonly:
            return
        rows = []
        for (path, size, mtime_ns), input_key, model_key, vector in entries:
            data = np.ascontiguousarray(vector, "<f4").tobytes()
            rows.append((path, size, mtime_ns, input_key, model_key, zlib.crc32(data), data))
        if rows:
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO derived "
                    "(path, size, mtime_ns, input_key, model_key, crc, data) "
                    "VALUES (?,?,?,?,?,?,?)",
                    rows,
                )
            except sqlite3.DatabaseError as exc:
                self._reset(exc)

    def derived(
        self, identities: list[Identity], input_key: str, model_key: str
    ) -> dict[str | bytes, np.ndarray]:
        """The vectors :meth:`put_derived` kept for those `identities`, made from an input of
        `input_key` by the model of `model_key`, by path (float32; a damaged or other
        file's, input's or model's vector is left out, and made again)."""
        if self._db is None:
            return {}
        wanted = {path: (size, mtime) for path, size, mtime in identities}
        found: dict[str | bytes, np.ndarray] = {}
        try:
            for path, size, mtime, key, model, crc, data in self._entries(
                "model_key, crc, data", wanted, table="derived"
            ):
                if (
                    wanted.get(path) == (size, mtime)
                    and key == input_key
                    and model == model_key
                    and isinstance(data, bytes)
                    and len(data) % 4 == 0
                    and zlib.crc32(data) == crc
                ):
                    found[path] = np.frombuffer(data, "<f4")
        except sqlite3.DatabaseError as exc:
            self._reset(exc)
            return {}
        return found

    def stats(self) -> dict[str, int]:
        """``entries`` and ``bytes`` (the database file and its WAL on disk), for the
        manifest and the benchmark."""
        entries = 0
        if self._db is not None:
            try:
                entries = int(self._db.execute("SELECT COUNT(*) FROM inputs").fetchone()[0])
            except sqlite3.DatabaseError as exc:
                self._reset(exc)
        size = sum(p.stat().st_size for p in self.files()[:2] if p.exists())
        return {"entries": entries, "bytes": size}
