"""Cron for years: incremental runs, checkpoints, kill -9, duplicates, history, privacy,
config files and the cron wrapper, with real processes where it matters."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from batchscan import SCORE_PACKAGES, VERSION_COLUMNS, versions
from batchscan.cli import main
from batchscan.engines.pipeline import ScanConfig
from batchscan.ingest.records import SKIPPED, ImageRecord
from batchscan.results import keys
from batchscan.results.state import StateStore
from batchscan.scoring.model import default_model_path
from tests.conftest import nightly

ROOT = Path(__file__).resolve().parents[1]


def scan(archive: Path, out: Path, *extra: str) -> dict:
    """Run the command in-process; returns the manifest."""
    assert main(["scan", str(archive), "--out", str(out), "--no-progress", *extra]) == 0
    import json

    return json.loads((out / "manifest.json").read_text())


def images(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "images.parquet").set_index("path")


def studies(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "studies.parquet").set_index("study_instance_uid")


def test_second_run_reads_only_what_changed(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = scan(archive, out, "--workers", "0")
    assert (first["files_processed"], first["files_reused"]) == (21, 0)
    before = images(out)
    second = scan(archive, out, "--workers", "0")
    assert (second["files_processed"], second["files_reused"]) == (0, 21)
    assert second["engine"]["device"] is None, "nothing to score: the model is never loaded"
    pd.testing.assert_frame_equal(images(out), before)

    pa_file = archive / "2025/ACC1000/1/IM0000"
    info = pa_file.stat()
    os.utime(pa_file, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))  # same size, touched
    (archive / "2026/ACC1001/1/IM0000").unlink()  # a study's only frontal image deleted
    third = scan(archive, out, "--workers", "0")
    assert (third["files_processed"], third["files_reused"], third["files_removed"]) == (1, 19, 1)
    after = images(out)
    assert "2026/ACC1001/1/IM0000" not in after.index and len(after) == 20
    assert after.loc["2025/ACC1000/1/IM0000", "mtime_ns"] == info.st_mtime_ns + 10**9
    study = before.loc["2026/ACC1001/1/IM0000", "study_instance_uid"]
    assert study not in studies(out).index  # only a lateral left: no scored image
    assert len(studies(out)) == 7


def test_new_model_version_rescores_everything_from_the_store(
    archive: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    scan(archive, out, "--workers", "0")
    model = tmp_path / "models" / "retrained.keras"
    model.parent.mkdir()
    shutil.copy(default_model_path(), model)
    shutil.copy(default_model_path().with_suffix(".json"), model.with_suffix(".json"))
    ood_file = default_model_path().with_suffix(".ood.npz")  # named by the card
    shutil.copy(ood_file, model.parent / ood_file.name)
    manifest = scan(archive, out, "--workers", "0", "--model", str(model))
    assert (manifest["files_processed"], manifest["files_reused"]) == (0, 21)
    assert manifest["files_rescored"] == manifest["counts_by_status"]["scored"] == 8
    assert set(images(out)["model_version"]) == {manifest["model"]["version"]}
    assert manifest["model"]["version"].startswith("retrained-")


def test_a_release_that_raises_the_row_format_says_so_before_reading_again(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One line, before the re-read starts, with why, how many files and for how long; and
    every run names the versions and the device behind its scores (manifest, runs.parquet)."""
    out = tmp_path / "out"
    first = scan(archive, out, "--workers", "0")
    assert first["versions"] == versions() and first["versions"]["tensorflow"]
    assert first["engine"]["device"].startswith(("CPU (", "GPU ("))
    monkeypatch.setattr(keys, "ROW_FORMAT", keys.ROW_FORMAT + 1)  # the next release's
    with caplog.at_level(logging.INFO, logger="batchscan"):
        second = scan(archive, out, "--workers", "0")
    assert second["files_processed"] == 21
    said = [r.getMessage() for r in caplog.records if "again" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        "reading the 21 files of the last complete run again: their rows were made under "
        f"row format {keys.ROW_FORMAT - 1} (this release's is {keys.ROW_FORMAT}); about "
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="batchscan"):
        third = scan(archive, out, "--workers", "0")
    assert third["files_processed"] == 0 and not any("again" in m for m in caplog.messages)
    runs = pd.read_parquet(out / "runs.parquet")
    for name, column in zip(("python", *SCORE_PACKAGES), VERSION_COLUMNS, strict=True):
        assert list(runs[column]) == [versions()[name]] * 3
    assert list(runs["device"].isna()) == [False, False, True], "no model loaded: no device"
    assert runs["row_keys"].nunique() == 2


def test_the_reread_line_names_an_input_version_options_and_older_states(tmp_path: Path) -> None:
    config = ScanConfig(archive=tmp_path, out=tmp_path)
    state = StateStore(tmp_path / "state.sqlite")
    assert keys.reread_notice(state, config) is None, "an empty state reads nothing again"
    old_input = keys.input_key(config, keys.INPUT_VERSION - 1)
    for n, made in enumerate((keys.input_key(config), old_input, old_input)):
        facts = {"row_keys": f"{keys.header_key(config)}.{made}.d.m.s"}
        state.begin_run(f"r{n}", "2026-01-01T00:00:00", "m", "0", facts)
        state.end_run(f"r{n}", "ok", {"files_found": 10**6, "images_per_second": 76.4 + n})
    assert keys.reread_notice(state, config) == (
        "reading the 1,000,000 files of the last complete run again: their rows were made "
        f"under input version {keys.INPUT_VERSION - 1} (this release's is "
        f"{keys.INPUT_VERSION}); about 3.5 h at the 78 images/s of this state's fastest run "
        "(CHANGELOG.md gives a release's cost at a million files)"
    )
    assert keys.reread_notice(state, replace(config, min_edge=None)).count("decode options")
    assert keys.reread_notice(state, replace(config, all_modalities=True)).count("header options")
    state.begin_run("r3", "2026-01-01T00:00:00", "m", "0")  # killed: the rows are mixed
    assert "input version" in keys.reread_notice(state, config)
    state.close()
    # a state of a release before the five keys: no run names them, one settings key a row
    older = StateStore(tmp_path / "older.sqlite")
    older.save([ImageRecord(path="a", abs_path="/a", status=SKIPPED)], "r", "0123abcd", "m")
    assert "under row format 5 or older" in keys.reread_notice(older, config)
    older.close()


def test_duplicate_sop_instance_is_scored_once(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    original = "2025/ACC1000/1/IM0000"
    copy = "2025/ACC1000/1/0-copy-of-IM0000"  # sorts before the original
    scan(archive, out, "--workers", "0")
    n_scored = studies(out)["n_images_scored"].sum()
    shutil.copy(archive / original, archive / copy)
    scan(archive, out, "--workers", "0")
    rows = images(out)
    assert rows.loc[copy, "status"] == "scored"
    assert rows.loc[original, ["status", "reason"]].tolist() == ["skipped", f"duplicate_of:{copy}"]
    assert pd.isna(rows.loc[original, "score"])
    assert studies(out)["n_images_scored"].sum() == n_scored
    (archive / copy).unlink()  # the winner goes: the other is scored again, without a read
    manifest = scan(archive, out, "--workers", "0")
    assert manifest["files_processed"] == 0
    rows = images(out)
    assert rows.loc[original, "status"] == "scored" and rows.loc[original, "score"] > 0


def _slow_scan(archive: Path, out: Path) -> subprocess.Popen:
    code = (
        f"import sys; from pathlib import Path; sys.path.insert(0, {str(ROOT)!r});"
        "from batchscan.engines.pipeline import ScanConfig; from batchscan.scan import run_scan;"
        "from tests.faults import slow_prepare;"
        f"run_scan(ScanConfig(archive=Path({str(archive)!r}), out=Path({str(out)!r}), workers=1,"
        " files_per_task=1, batch_size=2, checkpoint_seconds=0.1, prepare=slow_prepare))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _committed_rows(state: Path) -> int:
    try:
        with sqlite3.connect(f"file:{state}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM files").fetchone()[0])
    except sqlite3.Error:
        return 0


def _wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_kill_9_mid_run_keeps_reports_and_next_run_finishes(
    archive: Path, tmp_path: Path, other_model: Path
) -> None:
    held_back = tmp_path / "held_back"
    shutil.move(archive / "2026", held_back)
    out = tmp_path / "out"
    scan(archive, out, "--workers", "0")
    previous = {name: (out / name).read_bytes() for name in ("images.parquet", "studies.csv")}

    shutil.move(held_back, archive / "2026")
    process = _slow_scan(archive, out)
    try:
        _wait_for(lambda: _committed_rows(out / "state.sqlite") >= 12)  # 8 old + new ones
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    for name, data in previous.items():
        assert (out / name).read_bytes() == data, "previous reports must stay as they were"
    pd.read_parquet(out / "images.parquet")  # and readable

    resumed = scan(archive, out, "--workers", "0")
    assert resumed["files_processed"] < 11, "work committed before the kill is not redone"
    clean_out = tmp_path / "clean"
    scan(archive, clean_out, "--workers", "0")
    pd.testing.assert_frame_equal(images(out), images(clean_out))
    pd.testing.assert_frame_equal(studies(out), studies(clean_out))
    runs = pd.read_parquet(out / "runs.parquet")
    assert runs["outcome"].tolist() == ["ok", "interrupted", "ok"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    # the input store the killed run left is used: a new model reads (almost) nothing
    changed = scan(archive, out, "--workers", "0", "--model", str(other_model))
    assert changed["files_processed"] <= 1 < changed["files_rescored"]
    scan(archive, clean_out, "--workers", "0", "--model", str(other_model))
    a, b = images(out), images(clean_out)
    assert ((a["score"] - b["score"]).abs().fillna(0) < 1e-4).all()


def test_second_concurrent_run_exits_3_naming_the_holder(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = _slow_scan(archive, out)
    try:
        _wait_for(
            lambda: (out / ".batchscan.lock").exists() and _committed_rows(out / "state.sqlite") > 0
        )
        second = subprocess.run(
            [sys.executable, "-m", "batchscan.cli", "scan", str(archive), "--out", str(out)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert second.returncode == 3
    assert f"pid {process.pid}" in second.stderr and "started" in second.stderr
    assert second.stderr.count("\n") == 1


def test_patient_key_only_with_a_key_and_stable(archive: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    scan(archive, out, "--workers", "0")
    assert "patient_key" not in images(out).columns
    assert "patient_key" not in studies(out).columns

    key = b"site-secret-key-0123456789"
    key_file = tmp_path / "pseudonym.key"
    key_file.write_bytes(key + b"\n")
    keyed = tmp_path / "keyed"
    scan(archive, keyed, "--workers", "0", "--pseudonym-key-file", str(key_file))
    rows = images(keyed)
    expected = hmac.new(key, b"DEMO0000", hashlib.sha256).hexdigest()
    assert rows.loc["2025/ACC1000/1/IM0000", "patient_key"] == expected
    assert expected in set(studies(keyed)["patient_key"])
    monkeypatch.setenv("BATCHSCAN_PSEUDONYM_KEY", key.decode())
    again = tmp_path / "again"
    scan(archive, again, "--workers", "0")
    pd.testing.assert_series_equal(images(again)["patient_key"], rows["patient_key"])

    for folder in (out, keyed, again):  # nothing identifying in any file, state included
        for path in folder.iterdir():
            if path.is_file():
                blob = path.read_bytes()
                for secret in (b"DEMO^PATIENT", b"DEMO0000", b"19700101"):
                    assert secret not in blob, (path.name, secret)


def test_config_file_with_command_line_winning(archive: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "etc" / "batchscan.toml"
    config.parent.mkdir()
    config.write_text(
        f'archive = "{archive}"\nout = "../reports"\nworkers = 0\nbatch_size = 3\n'
        "all_modalities = true\n"
    )
    assert main(["scan", "--config", str(config), "--no-progress", "--batch-size", "5"]) == 0
    import json

    manifest = json.loads((tmp_path / "reports" / "manifest.json").read_text())
    assert manifest["arguments"]["batch_size"] == 5  # the flag wins
    assert manifest["arguments"]["workers"] == 0 and manifest["arguments"]["all_modalities"]
    for text, key in (
        ("bacth_size = 4\n", "bacth_size"),
        ('workers = "two"\n', "workers"),
        ("file_timeout = -1\n", "file_timeout"),
        ("archive = [1\n", "not valid TOML"),
    ):
        config.write_text(text)
        capsys.readouterr()
        assert main(["scan", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert key in err and err.count("\n") == 1


def test_archive_is_never_written(archive: Path, tmp_path: Path) -> None:
    def snapshot() -> dict[str, tuple[int, int, bytes]]:
        return {
            str(p): (p.stat().st_mtime_ns, p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
            for p in [archive, *sorted(archive.rglob("*"))]
        }

    before = snapshot()
    out = tmp_path / "out"
    scan(archive, out)  # worker processes
    scan(archive, out, "--workers", "0")
    assert snapshot() == before


def test_cron_wrapper_logs_and_passes_the_status_through(archive: Path, tmp_path: Path) -> None:
    config = tmp_path / "batchscan.toml"
    config.write_text(f'archive = "{archive}"\nout = "{tmp_path / "out"}"\nworkers = 1\n')
    logs = tmp_path / "logs"
    done = nightly(config, logs)
    assert done.returncode == 0 and done.stdout == "", done.stdout
    (log,) = logs.glob("batchscan-*.log")
    assert "batchscan run" in log.read_text()
    config.write_text("workers = -3\n")
    time.sleep(1.1)  # a new log name per second
    failed = nightly(config, logs)
    assert failed.returncode == 2
    assert "status 2" in failed.stdout
    assert len(list(logs.glob("batchscan-*.log"))) == 2


def test_unusable_state_is_a_usage_error(archive: Path, tmp_path: Path, capsys) -> None:
    state = tmp_path / "state.sqlite"
    state.write_bytes(b"not a database at all" * 100)
    argv = ["scan", str(archive), "--out", str(tmp_path / "out"), "--state", str(state)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot use state database" in err and err.count("\n") == 1


def test_the_state_forgets_only_instances_listed_within_the_window(tmp_path: Path) -> None:
    """Schema 2 without a PACS: a state of schema 1 is upgraded in place; a run over a
    window of dates removes the unseen instances listed under those dates, keeps the rest;
    an instance's size is the stored one until it is fetched."""
    from batchscan.results.aggregate import aggregate_studies
    from batchscan.results.state import RowKeys

    path = tmp_path / "state.sqlite"
    StateStore(path).close()
    with sqlite3.connect(path) as db:  # as a release before the PACS tables left it
        db.execute("DROP TABLE pacs_listed")
        db.execute("DROP TABLE pacs_marks")
        db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    keys = RowKeys("h", "i", "score-d", "m", "none")
    state = StateStore(path)
    try:
        listed = {"1.1/1.2/1.3": "2026-01-01", "1.1/1.2/1.4": "2026-03-01", "1.5/1.6/1.7": None}
        records = [
            ImageRecord(path=p, abs_path=p, size=10, mtime_ns=0, study_instance_uid=p[:3])
            .skip("view:LL")
            for p in listed
        ]  # fmt: skip
        state.list_instances(listed.items())
        state.save(records, "run1", keys, "m")
        aggregate = lambda rows: aggregate_studies(rows, 0.5, "m")  # noqa: E731
        state.finish("run1", aggregate)
        # a night over March: the instance of January is not asked for, that of March is gone
        assert not list(state.pending([], "run2", keys, "m"))
        finished = state.finish("run2", aggregate, covered=("2026-02-01", None))
        assert (finished.removed, finished.files, finished.seen) == (1, 2, 0)
        # up to a date: January's is gone; an undated study is asked for only by a run
        # over every date
        assert state.finish("run3", aggregate, covered=(None, "2026-12-31")).removed == 1
        assert state.finish("run4", aggregate).removed == 1
        # a PACS record's size is unknown until fetched: the stored row's stands for it
        state.save([records[0]], "run5", keys, "m")
        found = ImageRecord(path=records[0].path, abs_path=records[0].path, mtime_ns=0)
        assert not list(state.pending([found], "run6", keys, "m")), "reused, not fetched"
        assert found.size == 10
        state.set_high_water("https://pacs/dicom-web", "2026-03-02", 3, "run6")
        assert state.high_water("https://pacs/dicom-web") == ("2026-03-02", 3)
    finally:
        state.close()
