"""The report-label cache: the label of every radiology report seen so far, by accession.

``REPORT_DIR/report_labels.sqlite`` (opened by :func:`batchscan.storage.sqlite.open_store`:
WAL, a schema version row, private files). A report is known by its accession number and a
digest of its text (:func:`report_digest`), never by the text itself, so that a report is
labelled once and again only when its text changes, and a nightly export that holds only
the day's reports adds to what earlier nights labelled (:mod:`batchscan.site.monitoring`
during a scan; ``batchscan adapt`` reads it, :func:`known_labels`).

It holds labels that the reports may no longer give (a report that left the export keeps
its label here), so a cache that cannot be used is refused
(:attr:`~batchscan.storage.sqlite.OnDamage.REFUSE`), never started afresh behind the
site's back.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from batchscan.site.report_labels import Report, ReportLabeler
from batchscan.storage.sqlite import OnDamage, Schema, StoreError, open_readonly, open_store

LABELS_DB: Final = "report_labels.sqlite"
#: The cache's table and its version (:mod:`batchscan.storage.sqlite`); a cache made before
#: the version row existed is of version 1.
SCHEMA: Final = Schema(
    version=1,
    script="CREATE TABLE IF NOT EXISTS labels (accession TEXT PRIMARY KEY, digest TEXT NOT "
    "NULL, label TEXT NOT NULL, reason TEXT NOT NULL) WITHOUT ROWID;",
)


def report_digest(text: str | None) -> str:
    """The digest a report is known by (its text changes, its label is made again)."""
    return hashlib.sha256((text or "").encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(slots=True)
class Refreshed:
    """What :meth:`LabelCache.refresh` did."""

    reports: int = 0
    labelled: int = 0
    unchanged: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


class LabelCache:
    """The labels of the reports seen so far, by accession, with the digest of the text
    they were made from (so a report is labelled once, and again only when it changes).
    Kept across runs: a nightly export that holds only the day's reports adds to it.

    Raises
    ------
    batchscan.storage.sqlite.StoreError
        The cache cannot be used (the scan fails; the last good monitoring files stay).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_store(path, SCHEMA, on_damage=OnDamage.REFUSE)

    def refresh(self, reports: list[Report], labeler: Callable[[], ReportLabeler]) -> Refreshed:
        """Label the reports that are new or changed (`labeler` is made only if any is) and
        return every label known, ``pneumonia``, ``normal`` or ``uncertain``."""
        known = {
            accession: digest
            for accession, digest in self._db.execute("SELECT accession, digest FROM labels")
        }
        todo = [(r, report_digest(r.text)) for r in reports]
        todo = [(r, d) for r, d in todo if known.get(r.key) != d]
        done = Refreshed(reports=len(reports), labelled=len(todo))
        done.unchanged = len(reports) - len(todo)
        if todo:
            decisions = labeler().label_many(r.text for r, _ in todo)
            rows = [
                (r.key, d, decision.label, decision.reason)
                for (r, d), decision in zip(todo, decisions, strict=True)
            ]
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")
        for accession, label, reason in self._db.execute(
            "SELECT accession, label, reason FROM labels"
        ):
            done.labels[accession], done.reasons[accession] = label, reason
        return done

    def close(self) -> None:
        """Close the database."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()


def known_labels(path: Path) -> dict[str, tuple[str, str, str]]:
    """The labels a :class:`LabelCache` at `path` holds, read-only (another process, such
    as ``batchscan adapt``, reads a scan's labels while a scan may run): (digest, label,
    reason) by accession; empty when there is no readable cache."""
    if not path.is_file():
        return {}
    try:
        db = open_readonly(path, SCHEMA)
    except StoreError:
        return {}
    try:
        return {
            accession: (digest, label, reason)
            for accession, digest, label, reason in db.execute(
                "SELECT accession, digest, label, reason FROM labels"
            )
        }
    except sqlite3.Error:
        return {}
    finally:
        db.close()
