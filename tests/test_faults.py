"""Crashing and hanging decoders, files that change under the job, output faults."""

from __future__ import annotations

import errno
import os
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from batchscan.cli import main
from batchscan.engines.pipeline import ScanConfig, prepare_record
from batchscan.ingest.records import ImageRecord
from batchscan.results import report
from batchscan.scan import run_scan
from batchscan.synth import RadiographSpec, chest_phantom, write_radiograph
from tests.conftest import real_file
from tests.faults import ClosingPrepare, deleting_prepare, faulty_prepare, pid_prepare


@pytest.fixture(scope="module")
def clean_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    for i in range(10):
        write_radiograph(
            root / f"s{i}" / f"IM{i}", chest_phantom(192, seed=i, opacity=i % 2), RadiographSpec()
        )
    return root


def _images(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "images.parquet").set_index("path").sort_index()


def test_crash_timeout_and_oom_cost_one_file_each(clean_archive: Path, tmp_path: Path) -> None:
    clean_out = tmp_path / "clean"
    run_scan(ScanConfig(archive=clean_archive, out=clean_out, workers=2))
    archive = tmp_path / "archive"
    shutil.copytree(clean_archive, archive)
    for marker in ("SEGFAULT", "HANG", "OOM"):
        shutil.copy(archive / "s1" / "IM1", archive / "s2" / f"{marker}_IM")
    out = tmp_path / "faulty"
    # 3 files per task: each fault shares its task with good files that must still be scored
    result = run_scan(
        ScanConfig(
            archive=archive,
            out=out,
            workers=2,
            files_per_task=3,
            file_timeout=3.0,
            prepare=faulty_prepare,
        )
    )
    images = _images(out)
    assert len(images) == 13
    assert images.loc["s2/SEGFAULT_IM", ["status", "reason"]].tolist() == ["failed", "worker_crash"]
    assert "SIGSEGV" in images.loc["s2/SEGFAULT_IM", "detail"]
    assert images.loc["s2/OOM_IM", "reason"] == "worker_crash"
    assert images.loc["s2/HANG_IM", ["status", "reason"]].tolist() == ["failed", "timeout"]
    clean = _images(clean_out)
    good = images.loc[clean.index]
    assert (good["status"] == "scored").all()
    pd.testing.assert_series_equal(good["score"], clean["score"])
    assert result.manifest["counts_by_status"] == {"scored": 10, "skipped": 0, "failed": 3}


def test_vanished_and_changing_files_are_unstable(tmp_path: Path) -> None:
    path = write_radiograph(tmp_path / "a", chest_phantom(64), RadiographSpec())
    record = ImageRecord(
        path="a", abs_path=str(path), size=path.stat().st_size, mtime_ns=path.stat().st_mtime_ns
    )
    with path.open("ab") as handle:  # still being written by the archive
        handle.write(b"\0\0")
    options = ScanConfig(archive=tmp_path, out=tmp_path).stage_options
    assert prepare_record(record, options) is None
    assert (record.status, record.reason) == ("skipped", "unstable")
    record = ImageRecord(path="a", abs_path=str(path), size=1, mtime_ns=1)
    path.unlink()
    prepare_record(record, options)
    assert (record.status, record.reason) == ("skipped", "unstable")


def test_disk_full_keeps_previous_reports(
    clean_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out, archive = tmp_path / "reports", tmp_path / "archive"
    shutil.copytree(clean_archive, archive)
    argv = ["scan", str(archive), "--out", str(out), "--workers", "0"]
    assert main(argv) == 0

    def reports() -> dict[str, bytes]:
        return {
            p.name: p.read_bytes()
            for p in out.iterdir()
            if not p.name.startswith(".") and not p.name.startswith(("state.sqlite", "inputs."))
        }

    before = reports()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    shutil.copy(archive / "s0" / "IM0", archive / "new.dcm")  # work for the failing run
    monkeypatch.setattr(report.pacsv, "CSVWriter", full)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    assert reports() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()  # space again: the state is intact and the next run completes
    assert main(argv) == 0
    runs = pd.read_parquet(out / "runs.parquet")
    assert list(runs["outcome"]) == ["ok", "failed", "ok"]
    images = pd.read_parquet(out / "images.parquet")
    assert len(images) == 11 and images["status"].tolist().count("skipped") == 1  # duplicate


def test_unwritable_report_dir_is_a_usage_error(
    clean_archive: Path, tmp_path: Path, capsys
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["scan", str(clean_archive), "--out", str(blocker / "reports")]) == 2
    assert "cannot create report folder" in capsys.readouterr().err


def test_hostile_archive_end_to_end(
    clean_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Truncated RG1, a 65535 x 65535 header, an unreadable folder, a file deleted mid-run:
    exit 0, every file accounted, the good files scored exactly as in the clean archive."""
    import pydicom

    from batchscan.ingest import discover

    clean_out = tmp_path / "clean"
    run_scan(ScanConfig(archive=clean_archive, out=clean_out, workers=2))
    archive = tmp_path / "archive"
    shutil.copytree(clean_archive, archive)
    rg1 = real_file("RG1_J2KR.dcm").read_bytes()
    (archive / "rg1_truncated").write_bytes(rg1[: len(rg1) // 3])
    huge = pydicom.dcmread(archive / "s0" / "IM0")
    huge.Rows = huge.Columns = 65535
    huge.save_as(archive / "huge")
    (archive / "locked").mkdir()
    shutil.copy(archive / "s1" / "IM1", archive / "locked" / "IM")
    shutil.copy(archive / "s1" / "IM1", archive / "DELETE_ME")
    real_open = os.open

    def open_(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        # a folder this (root) process could read, denied as for a user
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(discover.os, "open", open_)
    out = tmp_path / "hostile"
    run_scan(ScanConfig(archive=archive, out=out, workers=2, prepare=deleting_prepare))
    images = _images(out)
    assert images.loc["rg1_truncated", "status"] == "failed"
    assert images.loc["huge", ["status", "reason"]].tolist() == ["failed", "too_large"]
    assert images.loc["locked/", "reason"] == "unreadable_dir:permission_denied"
    assert images.loc["DELETE_ME", ["status", "reason"]].tolist() == ["skipped", "unstable"]
    clean = _images(clean_out)
    pd.testing.assert_series_equal(images.loc[clean.index, "score"], clean["score"])
    assert len(images) == len(clean) + 4


def test_workers_are_recycled_after_many_files(clean_archive: Path) -> None:
    """A fresh process every `recycle_after` files: codec memory leaks cannot pile up over a
    night of millions of files; nothing is lost or prepared twice on the way."""
    from batchscan.engines.pipeline import worker_context
    from batchscan.engines.workers import WorkerPool
    from batchscan.ingest.discover import iter_files
    from batchscan.ingest.records import chunks

    context = worker_context()
    options = ScanConfig(archive=clean_archive, out=clean_archive).stage_options
    with WorkerPool(context, 1, options, pid_prepare, recycle_after=4) as pool:
        batches = list(pool.run(chunks(iter_files(clean_archive), 2)))
        recycled = pool.recycled
    records = [r for b in batches for r in b.records]
    assert sorted(r.path for r in records) == sorted(
        str(p.relative_to(clean_archive)) for p in clean_archive.rglob("IM*")
    )
    assert sum(len(b.inputs) for b in batches) == 10
    per_process = Counter(r.detail for r in records)
    assert recycled >= 1 and len(per_process) == recycled + 1
    # a worker due for recycling finishes the tasks it holds (depth 2 x 2 files) first
    assert max(per_process.values()) <= 4 + 2 * 2


def test_a_stopping_worker_closes_its_stages(clean_archive: Path, tmp_path: Path) -> None:
    """Every worker process, recycled or stopped at the end, calls its stages' ``close``
    (a PACS scan's worker releases its association there; one left open kept the process
    alive until it was killed)."""
    from batchscan.engines.pipeline import worker_context
    from batchscan.engines.workers import WorkerPool
    from batchscan.ingest.discover import iter_files
    from batchscan.ingest.records import chunks

    options = ScanConfig(archive=clean_archive, out=clean_archive).stage_options
    prepare = ClosingPrepare(str(tmp_path))
    with WorkerPool(worker_context(), 1, options, prepare, recycle_after=4) as pool:
        batches = list(pool.run(chunks(iter_files(clean_archive), 2)))
    workers = {r.detail for b in batches for r in b.records}
    assert len(workers) >= 2  # the worker, recycled at least once
    assert {p.name for p in tmp_path.iterdir()} == {f"closed-{pid}" for pid in workers}
