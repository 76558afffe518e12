"""How batchscan puts things on disk: one way to write a file (whole or not at all, durable,
private), one way to open a SQLite store (WAL, a version row, private files, each store's own
failure policy), and each store's SQL inside the module that owns its tables."""

from __future__ import annotations

import ast
import errno
import os
import re
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchscan.ingest.records import SCORED, ImageRecord
from batchscan.results.state import RowKeys, StateError, StateStore, scored_files
from batchscan.site.label_cache import LabelCache, known_labels
from batchscan.site.report_labels import ReportLabeler, read_reports
from batchscan.storage import files
from batchscan.storage.sqlite import (
    DamagedError,
    OnDamage,
    OtherVersionError,
    Schema,
    UnavailableError,
    open_readonly,
    open_store,
    sqlite_files,
)

PACKAGE = Path(__file__).resolve().parents[1] / "batchscan"
#: The one module that renames files.
WRITER = PACKAGE / "storage" / "files.py"
#: The modules that own tables, and so may hold SQL: the four stores and the opener (which
#: owns the ``meta`` table every store has).
OWNERS = {
    PACKAGE / "results" / "state.py",
    PACKAGE / "scoring" / "input_store.py",
    PACKAGE / "pacs" / "outbox.py",
    PACKAGE / "site" / "label_cache.py",
    PACKAGE / "storage" / "sqlite.py",
}
SOURCES = sorted(PACKAGE.rglob("*.py"))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


# -- one way to write a file -----------------------------------------------------------


def test_a_whole_write_replaces_the_file_privately_and_leaves_nothing(
    tmp_path: Path, umask_022: None
) -> None:
    final = tmp_path / "evaluation.json"
    final.write_text("old")
    final.chmod(0o644)
    files.write(final, "new text é")
    assert final.read_text(encoding="utf-8") == "new text é"
    assert mode_of(final) == 0o640
    files.write(final, b"\x00bytes")
    assert final.read_bytes() == b"\x00bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.json"]


def test_a_stricter_umask_wins(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        files.write(tmp_path / "a", "x")
        with files.writing(tmp_path / "b") as temporary:
            temporary.write_text("y")
    finally:
        os.umask(previous)
    assert mode_of(tmp_path / "a") == mode_of(tmp_path / "b") == 0o600


def test_a_failed_write_keeps_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "report.html"
    final.write_text("last good")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        files.write(final, "half")
    with pytest.raises(OSError, match="No space left"), files.writing(final) as temporary:
        temporary.write_text("half")
    assert final.read_text() == "last good"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_a_streamed_write_is_published_only_when_the_block_ends(
    tmp_path: Path, umask_022: None
) -> None:
    final = tmp_path / "model.keras"
    with files.writing(final, suffix=".keras") as temporary:
        assert temporary.name.startswith(".model.keras.") and temporary.suffix == ".keras"
        assert temporary.parent == tmp_path and not final.exists()
        temporary.write_bytes(b"weights")  # a library reopens the file: the mode stays
    assert final.read_bytes() == b"weights" and mode_of(final) == 0o640
    with pytest.raises(RuntimeError), files.writing(final) as temporary:
        temporary.write_bytes(b"broken")
        raise RuntimeError("the library failed")
    assert final.read_bytes() == b"weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]


def test_temporaries_published_later_lose_wide_modes_and_can_be_cleared(
    tmp_path: Path, umask_022: None
) -> None:
    """The scan's way: reports written to temporaries named by the run, published at the
    end; a library that made its temporary 0644 does not make the report 0644."""
    final = tmp_path / "images.parquet"
    temporary = files.temporary_path(final, "run1")
    assert temporary == tmp_path / ".images.parquet.run1.tmp"
    temporary.write_bytes(b"rows")
    temporary.chmod(0o666)
    files.publish(temporary, final)
    assert final.read_bytes() == b"rows" and mode_of(final) == 0o640
    for token in ("run2", "run3"):
        files.temporary_path(tmp_path / "studies.csv", token).write_text("")
    files.remove_temporaries(tmp_path, "run2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".studies.csv.run3.tmp",
        "images.parquet",
    ]
    files.remove_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["images.parquet"]


_RENAMES = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move")}


def _renames(tree: ast.AST) -> list[int]:
    """Lines that move a file: os.replace/rename/renames, shutil.move (also imported by
    name), and Path.rename/replace (a ``.rename(x)`` or ``.replace(x)`` with one argument;
    str.replace takes two, DataFrame.rename keywords)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any(
            (node.module, alias.name) in _RENAMES for alias in node.names
        ):
            lines.append(node.lineno)
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        named = isinstance(owner, ast.Name) and (owner.id, node.func.attr) in _RENAMES
        path_method = node.func.attr in ("rename", "replace") and len(node.args) == 1
        if named or (path_method and not node.keywords):
            lines.append(node.lineno)
    return lines


def test_the_renames_finder_finds_each_kind() -> None:
    source = (
        "import os, shutil\nfrom os import replace\nos.replace(a, b)\nos.rename(a, b)\n"
        "shutil.move(a, b)\np.rename(q)\np.replace(q)\ns.replace('a', 'b')\n"
        "frame.rename(columns={})\n"
    )
    assert _renames(ast.parse(source)) == [2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_file_is_renamed_into_place_by_the_one_writer(path: Path) -> None:
    if path == WRITER:
        assert _renames(ast.parse(path.read_text())), "the writer renames"
        return
    found = _renames(ast.parse(path.read_text()))
    assert not found, (
        f"{path.relative_to(PACKAGE)} moves a file itself (lines {found}): write through "
        "batchscan.storage.files (write, writing, publish)"
    )


# -- one way to open a store -------------------------------------------------------------

SCHEMA = Schema(version=1, script="CREATE TABLE IF NOT EXISTS things (name TEXT);")


def test_a_new_store_has_wal_a_version_row_and_private_files(
    tmp_path: Path, umask_022: None
) -> None:
    path = tmp_path / "store.sqlite"
    db = open_store(path, SCHEMA, on_damage=OnDamage.REFUSE)
    db.execute("INSERT INTO things VALUES ('a')")
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("1",)
    assert {p.name: mode_of(p) for p in sqlite_files(path) if p.exists()} == {
        "store.sqlite": 0o640,
        "store.sqlite-wal": 0o640,
        "store.sqlite-shm": 0o640,
    }
    db.close()
    reader = open_readonly(path, SCHEMA)
    assert reader.execute("SELECT name FROM things").fetchall() == [("a",)]
    with pytest.raises(sqlite3.OperationalError):
        reader.execute("INSERT INTO things VALUES ('b')")
    reader.close()


def test_an_older_version_is_upgraded_and_any_other_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    open_store(path, SCHEMA, on_damage=OnDamage.REFUSE).close()

    def add_size(db: sqlite3.Connection) -> None:
        db.execute("ALTER TABLE things ADD COLUMN size INTEGER")

    newer = Schema(version=2, script=SCHEMA.script, upgrades={1: add_size})
    db = open_store(path, newer, on_damage=OnDamage.REFUSE)
    db.execute("INSERT INTO things VALUES ('a', 3)")  # the new column is there
    assert db.execute("SELECT value FROM meta").fetchone() == ("2",)
    db.close()
    with pytest.raises(OtherVersionError) as refused:  # made by a newer batchscan
        open_store(path, SCHEMA, on_damage=OnDamage.REFUSE)
    assert (refused.value.found, refused.value.wanted) == ("2", 1)
    with pytest.raises(OtherVersionError):  # no step from 2 to 3
        open_store(path, Schema(version=3, script=""), on_damage=OnDamage.REFUSE)
    with pytest.raises(OtherVersionError):
        open_readonly(path, SCHEMA)
    assert open_readonly(path, newer).execute("SELECT size FROM things").fetchall() == [(3,)]


def test_each_store_keeps_its_failure_policy(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    path.write_bytes(b"another program's file " * 400)
    with pytest.raises(DamagedError):
        open_store(path, SCHEMA, on_damage=OnDamage.REFUSE)
    assert path.read_bytes().startswith(b"another program's file")
    told = []
    db = open_store(path, SCHEMA, on_damage=OnDamage.START_AFRESH, on_afresh=told.append)
    assert db.execute("SELECT COUNT(*) FROM things").fetchone() == (0,)
    assert len(told) == 1 and isinstance(told[0], DamagedError)
    db.execute("PRAGMA locking_mode=EXCLUSIVE")  # a store sound but busy now: never deleted
    db.execute("BEGIN EXCLUSIVE")
    db.execute("INSERT INTO things VALUES ('kept')")
    with pytest.raises(UnavailableError):
        open_store(
            path, SCHEMA, on_damage=OnDamage.START_AFRESH, busy_timeout=0.05, on_afresh=told.append
        )
    db.execute("COMMIT")
    db.close()
    assert len(told) == 1
    reader = open_readonly(path, SCHEMA)
    assert reader.execute("SELECT name FROM things").fetchall() == [("kept",)]
    reader.close()


def test_reading_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError):
        open_readonly(tmp_path / "none.sqlite", SCHEMA)
    assert list(tmp_path.iterdir()) == []


def test_a_label_cache_of_an_older_release_is_adopted(tmp_path: Path) -> None:
    """Caches made before the version row had only their table: they are version 1."""
    path = tmp_path / "report_labels.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE labels (accession TEXT PRIMARY KEY, digest TEXT NOT NULL, label TEXT "
        "NOT NULL, reason TEXT NOT NULL) WITHOUT ROWID"
    )
    db.execute("INSERT INTO labels VALUES ('A1', 'd', 'normal', 'normal_impression')")
    db.commit()
    db.close()
    assert known_labels(path) == {"A1": ("d", "normal", "normal_impression")}
    export = tmp_path / "ris.csv"
    export.write_text("accession_number,report\nA2,IMPRESSION: Right lower lobe pneumonia.\n")
    cache = LabelCache(path)
    refreshed = cache.refresh(read_reports(export), ReportLabeler)
    cache.close()
    assert refreshed.labels == {"A1": "normal", "A2": "pneumonia"}
    assert set(known_labels(path)) == {"A1", "A2"}


# -- the state answers by what its readers mean -------------------------------------------


def test_row_keys_are_written_and_parsed_in_one_place() -> None:
    keys = RowKeys("h", "i", "score-d", "m", "s")
    assert RowKeys.parse(str(keys)) == keys
    assert RowKeys.parse("h.i.d") is None  # an older row format


def test_adapt_reads_the_scored_rows_and_their_input_keys(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    keys = RowKeys("h", "input1", "score-d", "m", "s")
    state = StateStore(path)
    state.begin_run("r1", "2026-01-01T00:00:00", "v1", "test")
    scored = ImageRecord(path="a.dcm", abs_path="/x/a.dcm", status=SCORED, score=0.7)
    skipped = ImageRecord(path="b.dcm", abs_path="/x/b.dcm", status="skipped", reason="view:LL")
    state.save([scored, skipped], "r1", keys, "v1")
    old = ImageRecord(path="c.dcm", abs_path="/x/c.dcm", status=SCORED, score=0.2)
    state.save([old], "r1", "h.input0", "v1")
    state.commit()
    state.close()
    frame = scored_files(path, ["path", "score"]).sort_values("path")
    assert frame["path"].tolist() == ["a.dcm", "c.dcm"]
    assert frame["score"].tolist() == [0.7, 0.2]
    assert frame["input_key"].iloc[0] == "input1" and frame["input_key"].isna().iloc[1]
    with pytest.raises(ValueError, match="no file columns"):
        scored_files(path, ["path", "settings_key"])
    with pytest.raises(StateError):
        scored_files(tmp_path / "missing.sqlite", ["path"])


# -- each store owns its SQL --------------------------------------------------------------

#: A string that is a SQL statement (the statement's shape, in capitals as batchscan writes
#: SQL), not prose that happens to say "update" or "select".
_SQL = re.compile(
    r"^\s*(?:SELECT\b.*\bFROM\b|SELECT\s+\d|INSERT\s+(?:OR\s+\w+\s+)?INTO\b|UPDATE\s+\S+\s+SET\b"
    r"|DELETE\s+FROM\b|CREATE\s+(?:TEMP\s+|TEMPORARY\s+|UNIQUE\s+)?(?:TABLE|INDEX|VIEW|TRIGGER)\b"
    r"|DROP\s+(?:TABLE|INDEX)\b|ALTER\s+TABLE\b|PRAGMA\s+\w+|BEGIN\b|COMMIT\b|ROLLBACK\b)",
    re.DOTALL,
)


def _sql_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """The string literals of `tree` that are SQL statements; an f-string is read with
    ``{}`` for each value it formats."""
    found = []
    parts_of_fstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            parts_of_fstrings |= {id(v) for v in node.values}
            if _SQL.match(text):
                found.append((node.lineno, text))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in parts_of_fstrings
            and _SQL.match(node.value)
        ):
            found.append((node.lineno, node.value))
    return found


def test_the_sql_finder_tells_statements_from_prose() -> None:
    source = (
        'a = "SELECT size, mtime_ns FROM files WHERE path = ?"\n'
        'b = f"SELECT {columns} FROM files WHERE path IN ({marks})"\n'
        'c = "UPDATE files SET seen_run=? WHERE path=?"\n'
        'd = "Select the files from the archive"\n'
        'e = "update the model from the reports"\n'
        'f = "INSERT OR REPLACE INTO labels VALUES (?, ?)"\n'
    )
    assert [line for line, _ in _sql_strings(ast.parse(source))] == [2, 1, 3, 6]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_sql_lives_only_in_the_module_that_owns_the_table(path: Path) -> None:
    tree = ast.parse(path.read_text())
    found = _sql_strings(tree)
    imports_sqlite = any(
        isinstance(node, ast.Import) and any(a.name == "sqlite3" for a in node.names)
        for node in ast.walk(tree)
    )
    if path in OWNERS:
        assert found, f"{path.relative_to(PACKAGE)} owns tables, so it holds their SQL"
        return
    assert not found, (
        f"{path.relative_to(PACKAGE)} sends SQL to a store (lines {[n for n, _ in found]}): "
        "ask the store with a method that says what it wants"
    )
    assert not imports_sqlite, f"{path.relative_to(PACKAGE)} opens a database itself"


def test_a_batch_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    """A batch (the SRs of a scan) goes into place only after all are on disk; one that
    cannot be written leaves none of the batch, under its final name or as a temporary
    file."""
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "1.2.4").write_bytes(b"")  # a file where a study's folder should be
    first, second = outbox / "1.2.3" / "a.dcm", outbox / "1.2.4" / "b.dcm"
    with pytest.raises(OSError):
        files.write_many([(first, b"SR 1"), (second, b"SR 2")], token="run")
    assert sorted(p.name for p in outbox.rglob("*") if p.is_file()) == ["1.2.4"]
    files.write_many([(first, b"SR 1")], token="run")
    assert first.read_bytes() == b"SR 1"
    assert sorted(p.name for p in outbox.rglob("*") if p.is_file()) == ["1.2.4", "a.dcm"]
