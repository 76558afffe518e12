"""Faulty per-record stages for the isolation tests (imported by the worker processes).

A file whose name contains ``SEGFAULT`` kills its worker with a real SIGSEGV, as a crashing
C codec would; ``HANG`` sleeps far past any timeout; ``OOM`` exits as the OOM killer's
SIGKILL would. Every other file goes through the real stages.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np

from batchscan.engines.pipeline import prepare_record
from batchscan.ingest.header import StageOptions
from batchscan.ingest.records import ImageRecord


def faulty_prepare(record: ImageRecord, options: StageOptions) -> np.ndarray | None:
    """:func:`prepare_record`, except on the marked files."""
    name = os.path.basename(record.path)
    if "SEGFAULT" in name:
        os.kill(os.getpid(), signal.SIGSEGV)
    if "HANG" in name:
        time.sleep(600)
    if "OOM" in name:
        os.kill(os.getpid(), signal.SIGKILL)
    return prepare_record(record, options)


def deleting_prepare(record: ImageRecord, options: StageOptions) -> np.ndarray | None:
    """:func:`prepare_record`, but a file named ``DELETE_ME`` vanishes just before it is read
    (the archive's retention job removing it mid-run)."""
    if "DELETE_ME" in os.path.basename(record.path):
        os.unlink(record.abs_path)
    return prepare_record(record, options)


def slow_prepare(record: ImageRecord, options: StageOptions) -> np.ndarray | None:
    """:func:`prepare_record` after a pause: a run long enough to be killed in the middle."""
    time.sleep(0.15)
    return prepare_record(record, options)


def pid_prepare(record: ImageRecord, options: StageOptions) -> np.ndarray | None:
    """:func:`prepare_record`, noting in ``detail`` which process prepared the record."""
    tensor = prepare_record(record, options)
    record.detail = str(os.getpid())
    return tensor


class ClosingPrepare:
    """:func:`pid_prepare` with a ``close`` hook that leaves a file ``closed-PID`` in
    `folder`: which worker processes were closed as they stopped."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, record: ImageRecord, options: StageOptions) -> np.ndarray | None:
        return pid_prepare(record, options)

    def close(self) -> None:
        with open(os.path.join(self.folder, f"closed-{os.getpid()}"), "w"):
            pass
