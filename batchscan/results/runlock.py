"""One run per REPORT_DIR: an ``fcntl.flock`` on ``REPORT_DIR/.batchscan.lock``.

The kernel releases a flock when its process dies, however it dies, so a crashed run never
leaves a stale lock behind. The lock file holds the holder's pid and start time so that the
second run can say who holds it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

LOCK_FILE: Final = ".batchscan.lock"


class LockHeldError(RuntimeError):
    """Another process holds the REPORT_DIR lock."""


@contextmanager
def report_dir_lock(out_dir: Path) -> Iterator[None]:
    """Hold the lock of `out_dir` for the duration of the block.

    Raises
    ------
    LockHeldError
        At once, without waiting, when another run holds it; the message names the
        holder's pid and start time.
    """
    path = out_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            raise LockHeldError(
                f"{out_dir} is locked by another batchscan run ({holder})"
            ) from None
        started = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} started {started}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
