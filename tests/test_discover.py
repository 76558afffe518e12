"""Discovery: streaming walk, symlinks, special and unreadable entries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchscan.ingest import discover
from batchscan.ingest.discover import iter_files
from tests.conftest import scan_rows_unprivileged


def _by_path(root: Path) -> dict[str, tuple[str, str | None]]:
    return {r.path: (r.status, r.reason) for r in iter_files(root)}


def test_walks_nested_files_without_extensions(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "IM0001").write_bytes(b"x" * 10)
    (tmp_path / "top.dcm").write_bytes(b"y")
    (tmp_path / "empty").write_bytes(b"")
    found = _by_path(tmp_path)
    assert found == {
        "a/b/IM0001": ("pending", None),
        "top.dcm": ("pending", None),
        "empty": ("skipped", "empty_file"),
    }


def test_symlink_loops_and_duplicates_end(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"1")
    os.symlink(tmp_path, tmp_path / "d" / "up")  # loops back to the root
    os.symlink(tmp_path / "d", tmp_path / "again")  # second way into d
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    os.symlink(tmp_path / "self", tmp_path / "self")  # a symlink to itself
    found = _by_path(tmp_path)
    # d is walked once, through whichever of its two names comes first
    walked_as = "d" if "d/f" in found else "again"
    other = "again" if walked_as == "d" else "d"
    assert found[f"{walked_as}/f"] == ("pending", None)
    assert found[other] == ("skipped", "duplicate_dir")
    assert found[f"{walked_as}/up"] == ("skipped", "symlink_loop")
    assert found["dangling"] == ("failed", "broken_symlink")
    assert found["self"] == ("failed", "symlink_loop")
    assert sorted(found) == sorted([f"{walked_as}/f", f"{walked_as}/up", other, "dangling", "self"])


def test_fifo_is_not_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    assert _by_path(tmp_path) == {"pipe": ("skipped", "not_regular_file")}


def test_unreadable_directory_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "f").write_bytes(b"1")
    (tmp_path / "ok").write_bytes(b"1")
    real_open = os.open

    def open_(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        # root can read anything, so deny like a non-root user sees it
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(discover.os, "open", open_)
    found = _by_path(tmp_path)
    assert found == {
        "ok": ("pending", None),
        "locked/": ("failed", "unreadable_dir:permission_denied"),
    }


def test_unreadable_directory_for_real(open_folder: Path) -> None:
    """A folder its user may not list, in a real scan without privileges (as root, as in
    CI, the scan drops them): recorded, and its neighbour still read."""
    archive = open_folder / "archive"
    (archive / "locked").mkdir(parents=True)
    (archive / "locked" / "f").write_bytes(b"1")
    (archive / "ok").write_bytes(b"not a DICOM file")
    archive.chmod(0o755)  # whatever umask an earlier scan in this process left
    (archive / "ok").chmod(0o644)
    (archive / "locked").chmod(0)
    assert scan_rows_unprivileged(archive, open_folder / "out") == {
        "locked/": ("failed", "unreadable_dir:permission_denied"),
        "ok": ("skipped", "not_dicom"),
    }


def test_streams_before_the_walk_ends(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "f").write_bytes(b"1")
    walk = iter_files(tmp_path)
    first = next(walk)
    assert first.status == "pending"
    # the generator holds one open directory iterator per level, not a list of all files
    assert sum(1 for _ in walk) == 49
