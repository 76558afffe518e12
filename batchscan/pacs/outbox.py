"""The ledger of an SR folder (``--sr-out``, the *outbox*): which SR was written for which
study, and which was delivered to which PACS.

A SQLite file in the outbox (``outbox.sqlite``, opened by
:func:`batchscan.storage.sqlite.open_store`: WAL journal, a schema version row, private
files) beside the SR files, so that the folder is self-contained: ``batchscan send OUTBOX``
needs nothing else, a scan and a send may run at the same time, and a crash loses nothing:

* an SR file is written first (atomically, :func:`batchscan.storage.files.write`) and then
  recorded; an SR file without its row (a run killed in between) is recorded by the next
  run that derives the same UID, never written twice;
* a delivery is recorded, and committed, only after the PACS acknowledged the C-STORE, one
  SR at a time; a send stopped in the middle leaves the rest undelivered, not lost.

Nothing in the ledger identifies a patient: UIDs, file names, digests, scores and times
only. Each SR's SHA-256 is kept so that ``send`` never delivers a file that is not what was
written (one truncated or altered on disk is reported, not sent).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from batchscan.storage.sqlite import (
    OnDamage,
    OtherVersionError,
    Schema,
    StoreError,
    open_store,
)

OUTBOX_FILE: Final = "outbox.sqlite"
SCHEMA_VERSION: Final = 1

_TABLES: Final = """
CREATE TABLE IF NOT EXISTS reports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    study_instance_uid TEXT NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    model_version TEXT NOT NULL,
    score REAL NOT NULL,
    instance_number INTEGER NOT NULL,
    written_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_study ON reports (study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    latest_sop TEXT NOT NULL,
    scored INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    sop_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    delivered_at TEXT NOT NULL,
    PRIMARY KEY (sop_instance_uid, destination)
);
"""
#: The ledger's tables and their version (:mod:`batchscan.storage.sqlite`).
SCHEMA: Final = Schema(version=SCHEMA_VERSION, script=_TABLES)
#: Seconds a scan and a send wait for each other's write to the ledger.
BUSY_TIMEOUT: Final = 60.0


class OutboxError(RuntimeError):
    """The outbox cannot be used (not one, unreadable, another schema)."""


@dataclass(frozen=True, slots=True)
class Pending:
    """An SR not yet delivered to a destination."""

    sop_instance_uid: str
    path: Path
    sha256: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Outbox:
    """The ledger of one SR folder.

    Parameters
    ----------
    folder:
        The outbox folder.
    create:
        Make the folder and its ledger when missing (the scan); ``batchscan send`` opens
        only an existing one.

    Raises
    ------
    OutboxError
        The folder is no outbox (and `create` is false), or its ledger cannot be used.
    """

    def __init__(self, folder: Path, create: bool = False) -> None:
        self.folder = folder
        path = folder / OUTBOX_FILE
        if not create and not path.is_file():
            raise OutboxError(f"{folder} is no SR outbox (no {OUTBOX_FILE}; made by scan --sr-out)")
        try:  # the only record of what was delivered: refuse, never start afresh
            if create:
                folder.mkdir(parents=True, exist_ok=True)
            self._db = open_store(
                path,
                SCHEMA,
                on_damage=OnDamage.REFUSE,
                synchronous="FULL",  # a delivery recorded is on disk when send goes on
                busy_timeout=BUSY_TIMEOUT,
            )
        except OtherVersionError as exc:
            raise OutboxError(
                f"outbox {path} has schema {exc.found}, this batchscan reads {SCHEMA_VERSION}"
            ) from exc
        except (OSError, StoreError) as exc:
            raise OutboxError(f"cannot use SR outbox {path}: {exc}") from exc

    # -- what the scan writes ------------------------------------------------------------

    def has(self, sop_instance_uid: str) -> bool:
        """True when an SR of this UID is recorded (its content is then already written)."""
        return (
            self._db.execute(
                "SELECT 1 FROM reports WHERE sop_instance_uid=?", (sop_instance_uid,)
            ).fetchone()
            is not None
        )

    def next_instance_number(self, study_instance_uid: str) -> int:
        """1 for a study's first SR, then one more than its last."""
        row = self._db.execute(
            "SELECT MAX(instance_number) FROM reports WHERE study_instance_uid=?",
            (study_instance_uid,),
        ).fetchone()
        return int(row[0] or 0) + 1

    def record_many(self, reports: Iterable[tuple[str, str, Path, str, str, float, int]]) -> None:
        """Record SR files just written, in one transaction: each as (SOP Instance UID,
        Study Instance UID, file, SHA-256 of its bytes, model version, study score,
        instance number)."""
        rows = list(reports)
        if not rows:
            return
        with self._transaction():
            for sop, study, file, sha256, model_version, score, number in rows:
                self._db.execute(
                    "INSERT OR IGNORE INTO reports (sop_instance_uid, study_instance_uid, "
                    "file, sha256, model_version, score, instance_number, written_at) "
                    "VALUES (?,?,?,?,?,?,?,?)",
                    (sop, study, file.relative_to(self.folder).as_posix(), sha256,
                     model_version, score, number, _now()),
                )  # fmt: skip
                self._set_study(study, sop)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (the ledger is otherwise in autocommit mode)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _set_study(self, study_instance_uid: str, latest_sop: str) -> None:
        self._db.execute(
            "INSERT INTO studies VALUES (?, ?, 1) ON CONFLICT (study_instance_uid) "
            "DO UPDATE SET latest_sop=excluded.latest_sop, scored=1",
            (study_instance_uid, latest_sop),
        )

    def begin_pass(self) -> None:
        """Start a pass over the state's scored studies (each then named to :meth:`seen`),
        so that :meth:`lost_scored_images` can tell which studies are no longer among them.

        The names go to a temporary table (no disk sync), so that a pass over a million
        unchanged studies writes nothing to the ledger itself.
        """
        self._db.execute("CREATE TEMP TABLE IF NOT EXISTS seen (uid TEXT PRIMARY KEY)")
        self._db.execute("DELETE FROM seen")

    def seen(self, study_instance_uid: str) -> None:
        """Note that a study has scored images in this pass."""
        self._db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (study_instance_uid,))

    def current(self, study_instance_uid: str, latest_sop: str) -> None:
        """Note that a study's latest SR is `latest_sop` and that it has scored images
        (written only when that changes: an unchanged study costs one read)."""
        row = self._db.execute(
            "SELECT latest_sop, scored FROM studies WHERE study_instance_uid=?",
            (study_instance_uid,),
        ).fetchone()
        if row != (latest_sop, 1):
            self._set_study(study_instance_uid, latest_sop)

    def lost_scored_images(self) -> list[str]:
        """The studies with an earlier SR that were not :meth:`seen` in this pass and were
        not reported lost before, marked now: each is named in one run's summary, once."""
        with self._transaction():
            lost = [
                row[0]
                for row in self._db.execute(
                    "SELECT study_instance_uid FROM studies WHERE scored=1 AND "
                    "study_instance_uid NOT IN (SELECT uid FROM seen) ORDER BY 1"
                )
            ]
            self._db.executemany(
                "UPDATE studies SET scored=0 WHERE study_instance_uid=?", ((u,) for u in lost)
            )
        return lost

    # -- what send reads and writes ------------------------------------------------------

    def undelivered(self, destination: str) -> list[Pending]:
        """The SRs not yet acknowledged by `destination`, oldest first."""
        return [
            Pending(sop, self.folder / file, sha256)
            for sop, file, sha256 in self._db.execute(
                "SELECT sop_instance_uid, file, sha256 FROM reports WHERE sop_instance_uid NOT IN "
                "(SELECT sop_instance_uid FROM deliveries WHERE destination=?) ORDER BY seq",
                (destination,),
            )
        ]

    def delivered(self, sop_instance_uid: str, destination: str) -> None:
        """Record (and commit) that `destination` acknowledged this SR."""
        self._db.execute(
            "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?)",
            (sop_instance_uid, destination, _now()),
        )

    def count(self, table: str = "reports") -> int:
        """Rows of a ledger table (``reports``, ``deliveries``, ``studies``)."""
        if table not in ("reports", "deliveries", "studies"):
            raise ValueError(f"no ledger table {table!r}")
        return int(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def close(self) -> None:
        """Close the ledger."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
