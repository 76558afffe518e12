"""The model-input store and the four row keys: a model change opens no archive file, and a
missing, truncated, corrupt or damaged store means files are read again, never a crash or a
wrong score."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batchscan.cli import main
from batchscan.results import report_html
from batchscan.scoring.input_store import LEVEL_BYTES, STORE_FILE, InputStore, decode, encode
from tests.test_state import scan

#: Paths opened while a test's hook listens (one process-wide audit hook; audit hooks
#: cannot be removed, so it records only while a list is set here).
_OPENED: list[list[str]] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED and isinstance(args[0], str | bytes):
        _OPENED[-1].append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def images(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "images.parquet").set_index("path").sort_index()


def studies(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "studies.parquet").set_index("study_instance_uid").sort_index()


class Opened:
    """The archive files a block opens, beside those report.html draws pictures of."""

    def __init__(self, archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.archive = str(archive.resolve())
        self.pictured: set[str] = set()
        self.paths: list[str] = []
        for name in ("explain_file", "model_input"):  # the maps, the sample's thumbnails
            monkeypatch.setattr(report_html, name, self._noting(getattr(report_html, name)))

    def _noting(self, real):  # type: ignore[no-untyped-def]
        def drawn(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.pictured.add(os.path.realpath(path))
            return real(path, *args, **kwargs)

        return drawn

    def __enter__(self) -> Opened:
        _OPENED.append(self.paths)
        return self

    def __exit__(self, *exc: object) -> None:
        _OPENED.remove(self.paths)

    @property
    def beyond_pictures(self) -> set[str]:
        """Archive files opened, other than those of report.html's pictures."""
        inside = {
            os.path.realpath(p)
            for p in self.paths
            if os.path.realpath(p).startswith(self.archive + os.sep)
        }
        return inside - self.pictured


def assert_same_scores(out: Path, fresh: Path) -> None:
    """Images and studies of `out` equal those of a fresh scan, scores within 1e-4."""
    a, b = images(out), images(fresh)
    assert list(a.index) == list(b.index)
    for column in ("score", "ood_score"):
        assert np.allclose(
            a[column].astype(float), b[column].astype(float), atol=1e-4, equal_nan=True
        ), column
    facts = [c for c in a.columns if c not in ("score", "ood_score")]
    pd.testing.assert_frame_equal(a[facts], b[facts])
    s, t = studies(out), studies(fresh)
    assert np.allclose(s["score"], t["score"], atol=1e-4)
    pd.testing.assert_frame_equal(s.drop(columns="score"), t.drop(columns="score"))


def test_encoding_keeps_an_input_within_a_level_and_refuses_other_shapes() -> None:
    rng = np.random.default_rng(3)
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32)
    for grey in (
        rng.random((64, 64), dtype=np.float32),  # noise: no smaller
        np.add.outer(ramp, ramp) / 2 + rng.normal(0, 0.002, (64, 64)).astype(np.float32),
    ):
        x = np.repeat(grey[..., None], 3, axis=2)
        data = encode(x)
        back = decode(data)
        assert back.shape == (64, 64, 3) and back.dtype == np.float32
        assert np.abs(back - np.clip(x, 0, 1)).max() <= 0.5 / 65535 + 1e-7
    assert len(data) < 0.75 * LEVEL_BYTES, "a smooth picture deflates"
    with pytest.raises(ValueError):
        decode(data[:-5])
    with pytest.raises(ValueError):
        decode(b"\x00" * 100)
    with pytest.raises(ValueError, match="64, 64, 3"):
        encode(np.zeros((28, 28, 3), np.float32))
    x[0, 0, 1] += 0.5
    with pytest.raises(ValueError, match="channels"):
        encode(x)


def test_new_model_is_scored_from_the_store_without_opening_the_archive(
    archive: Path, tmp_path: Path, other_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    first = scan(archive, out, "--workers", "0")
    n_scored = first["counts_by_status"]["scored"]
    store = first["input_store"]
    assert store["entries"] == n_scored and store["bytes"] > 0
    assert (os.stat(out / STORE_FILE).st_mode & 0o777) == 0o640
    before = images(out)

    with Opened(archive, monkeypatch) as opened:
        changed = scan(archive, out, "--workers", "0", "--model", str(other_model))
    assert opened.beyond_pictures == set(), "the stages opened archive files"
    assert changed["files_processed"] == 0 and changed["files_rescored"] == n_scored
    assert changed["model"]["version"].startswith("site_model-")
    after = images(out)
    assert set(after.loc[after["status"] == "scored", "model_version"]) == {
        changed["model"]["version"]
    }
    scored = before["status"] == "scored"
    assert (np.abs(after["score"][scored] - before["score"][scored]) > 1e-3).all(), (
        "another model gives other scores"
    )

    fresh = tmp_path / "fresh"
    scan(archive, fresh, "--workers", "0", "--model", str(other_model))
    assert_same_scores(out, fresh)

    # back to the shipped model: again from the store, scores as in the first run
    with Opened(archive, monkeypatch) as opened:
        back = scan(archive, out, "--workers", "0")
    assert opened.beyond_pictures == set() and back["files_processed"] == 0
    assert np.allclose(images(out)["score"][scored], before["score"][scored], atol=1e-4)


def test_header_or_input_options_read_the_archive_again(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = scan(archive, out, "--workers", "0")
    found = first["files_found"]
    full = ("--workers", "0", "--full-resolution")  # the input key: another decode
    assert scan(archive, out, *full)["files_processed"] == found
    assert scan(archive, out, *full)["files_processed"] == 0
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    keyed = (*full, "--pseudonym-key-file", str(key))  # the header key
    assert scan(archive, out, *keyed)["files_processed"] == found
    assert scan(archive, out, *keyed)["files_processed"] == 0


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_an_unusable_store_means_the_files_are_read_again(
    archive: Path, tmp_path: Path, other_model: Path, damage: str, caplog
) -> None:
    out = tmp_path / "out"
    first = scan(archive, out, "--workers", "0")
    path = out / STORE_FILE
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a database " * 1000)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 3])
    else:
        path.unlink()
    for side in ("-wal", "-shm"):
        Path(f"{path}{side}").unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="batchscan"):
        changed = scan(archive, out, "--workers", "0", "--model", str(other_model))
    assert changed["files_processed"] == first["counts_by_status"]["scored"]
    assert changed["files_rescored"] == 0
    if damage != "missing":
        assert "input store" in caplog.text and "started afresh" in caplog.text
    assert changed["input_store"]["entries"] == first["input_store"]["entries"]
    fresh = tmp_path / "fresh"
    scan(archive, fresh, "--workers", "0", "--model", str(other_model))
    assert_same_scores(out, fresh)


def test_a_damaged_entry_means_that_file_alone_is_read_again(
    archive: Path, tmp_path: Path, other_model: Path
) -> None:
    out = tmp_path / "out"
    first = scan(archive, out, "--workers", "0")
    with sqlite3.connect(out / STORE_FILE) as db:
        path, data = db.execute("SELECT path, data FROM inputs ORDER BY path LIMIT 1").fetchone()
        flipped = bytes([data[0] ^ 0xFF]) + data[1:]
        db.execute("UPDATE inputs SET data=? WHERE path=?", (flipped, path))
    changed = scan(archive, out, "--workers", "0", "--model", str(other_model))
    n_scored = first["counts_by_status"]["scored"]
    assert (changed["files_processed"], changed["files_rescored"]) == (1, n_scored - 1)
    fresh = tmp_path / "fresh"
    scan(archive, fresh, "--workers", "0", "--model", str(other_model))
    assert_same_scores(out, fresh)


def test_store_is_pruned_of_vanished_and_changed_files(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = scan(archive, out, "--workers", "0")
    scored = images(out).query("status == 'scored'").index
    (archive / scored[0]).unlink()
    (archive / scored[1]).write_bytes(b"no longer a DICOM file")
    second = scan(archive, out, "--workers", "0")
    assert second["input_store"]["entries"] == first["input_store"]["entries"] - 2
    store = InputStore(out / STORE_FILE)
    try:
        stored = [(p, 0, 0) for p in (scored[0], scored[1], scored[2])]
        assert store.get(stored, "any") == {}
        with sqlite3.connect(out / STORE_FILE) as db:
            kept = {row[0] for row in db.execute("SELECT path FROM inputs")}
        assert scored[0] not in kept and scored[1] not in kept and scored[2] in kept
    finally:
        store.close()


def test_duplicates_and_the_domain_are_judged_again_from_the_state(
    archive: Path, tmp_path: Path, other_model: Path
) -> None:
    out = tmp_path / "out"
    original = "2025/ACC1000/1/IM0000"
    copy = "2025/ACC1000/1/0-copy-of-IM0000"  # sorts first: the original is its duplicate
    shutil.copy(archive / original, archive / copy)
    first = scan(archive, out, "--workers", "0")
    assert images(out).loc[original, "reason"] == f"duplicate_of:{copy}"
    # the demo's patients lie outside the card's (pediatric) domain: with skip, the scored
    # rows (and the duplicate) are judged again from their header facts without a read; the
    # skipped and failed files are read, as under skip the domain decides what is decoded
    skip = ("--model", str(other_model), "--out-of-domain", "skip")
    changed = scan(archive, out, "--workers", "0", *skip)
    n_scored = first["counts_by_status"]["scored"]
    assert changed["files_processed"] == first["files_found"] - n_scored - 1
    fresh = tmp_path / "fresh"
    scan(archive, fresh, "--workers", "0", *skip)
    a, b = images(out), images(fresh)
    assert (a["reason"][a["status"] != "failed"].notna()).all()
    pd.testing.assert_frame_equal(a, b)
    # taken back in: those rows were never decoded under this domain, so they are read
    again = scan(archive, out, "--workers", "0", "--model", str(other_model))
    assert again["files_processed"] == first["files_found"]
    assert images(out).loc[original, "reason"] == f"duplicate_of:{copy}"


def test_shadow_model_is_scored_beside_from_the_store_and_compared(
    archive: Path, tmp_path: Path, other_model: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "out"
    scan(archive, out, "--workers", "0")
    before = images(out)
    with Opened(archive, monkeypatch) as opened:
        shadowed = scan(archive, out, "--workers", "0", "--shadow-model", str(other_model))
    assert opened.beyond_pictures == set() and shadowed["files_processed"] == 0
    shadow_version = shadowed["model"]["shadow"]["version"]
    rows, study_rows = images(out), studies(out)
    scored = rows["status"] == "scored"
    assert np.allclose(rows["score"][scored], before["score"][scored], atol=1e-4), (
        "the reported score stays the model in use's"
    )
    assert rows["shadow_score"][scored].notna().all() and rows["shadow_score"][~scored].isna().all()
    assert set(study_rows["shadow_model_version"]) == {shadow_version}
    assert study_rows["shadow_flag"].dtype == bool

    fresh = tmp_path / "fresh"  # the shadow's scores are those the model gives when in use
    scan(archive, fresh, "--workers", "0", "--model", str(other_model))
    assert np.allclose(rows["shadow_score"][scored], images(fresh)["score"][scored], atol=1e-4)
    assert np.allclose(study_rows["shadow_score"], studies(fresh)["score"], atol=1e-4)
    assert (study_rows["shadow_flag"] == studies(fresh)["flag"]).all()

    capsys.readouterr()
    assert main(["evaluate", str(out), "--labels", str(archive / "labels.csv")]) == 0
    printed = capsys.readouterr().out
    assert "shadow comparison: " in printed and shadow_version in printed
    result = json.loads((out / "evaluation.json").read_text())
    comparison = result["shadow_comparison"]
    assert comparison["shadow"]["version"] == shadow_version
    assert comparison["model_in_use"]["auc"] == result["overall"]["auc"]
    assert "Model in use against the shadow model" in (out / "evaluation.html").read_text()

    with Opened(archive, monkeypatch) as opened:  # the shadow withdrawn: its columns go
        plain = scan(archive, out, "--workers", "0")
    assert opened.beyond_pictures == set() and plain["model"]["shadow"] is None
    assert images(out)["shadow_score"].isna().all()
    assert studies(out)["shadow_model_version"].isna().all()


def test_a_store_that_cannot_be_written_now_is_kept(tmp_path: Path, caplog) -> None:
    path = tmp_path / STORE_FILE
    store = InputStore(path)
    x = np.repeat(np.linspace(0, 1, 4096, dtype=np.float32).reshape(64, 64, 1), 3, axis=2)
    store.put([(("a", 1, 2), "key", x)])
    store.close()
    store = InputStore(path)
    with caplog.at_level(logging.WARNING, logger="batchscan"):
        store._reset(sqlite3.OperationalError("database or disk is full"))
    assert "kept" in caplog.text and path.is_file()
    assert store.holds([("a", 1, 2)], "key") == set(), "not used for the rest of the run"
    store.close()
    again = InputStore(path)  # the next run has it all
    assert set(again.get([("a", 1, 2)], "key")) == {"a"}
    again.close()


def test_a_store_of_the_previous_version_keeps_its_entries_and_gains_derived(
    tmp_path: Path,
) -> None:
    """A store made before the drift monitor (version 1: the entries alone) is upgraded in
    place by the next scan, never thrown away; until then a read-only reader (adapt, train)
    reads its entries as they are."""
    path = tmp_path / STORE_FILE
    x = np.repeat(np.linspace(0, 1, 4096, dtype=np.float32).reshape(64, 64, 1), 3, axis=2)
    data = encode(x)
    old = sqlite3.connect(path)  # the previous release's layout, as it wrote it
    old.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('encoding', '1');"
        "CREATE TABLE inputs (path NOT NULL UNIQUE, size INTEGER NOT NULL, "
        "mtime_ns INTEGER NOT NULL, input_key TEXT NOT NULL, crc INTEGER NOT NULL, "
        "data BLOB NOT NULL);"
    )
    old.execute("INSERT INTO inputs VALUES ('a', 1, 2, 'key', ?, ?)", (zlib.crc32(data), data))
    old.commit()
    old.close()
    reader = InputStore(path, readonly=True)
    assert set(reader.get([("a", 1, 2)], "key")) == {"a"} and reader.resets == 0
    reader.close()
    store = InputStore(path)
    assert store.resets == 0, "upgraded, not started afresh"
    assert set(store.get([("a", 1, 2)], "key")) == {"a"}
    store.put_derived([(("a", 1, 2), "key", "model", np.ones(3, np.float32))])
    store.close()
    again = InputStore(path, readonly=True)
    assert set(again.derived([("a", 1, 2)], "key", "model")) == {"a"}
    again.close()
    (version,) = sqlite3.connect(path).execute("SELECT value FROM meta").fetchone()
    assert version == "2"
