"""The one way batchscan writes a file: whole or not at all, durable, and private.

Readers poll what batchscan writes: dashboards read REPORT_DIR, ``batchscan send`` reads the
SR outbox, a scan loads the model ``train`` or ``adapt`` wrote. None of them may ever see
half a file, and a crash or a power cut must leave either the old file or the new one.
So every file goes the same way:

1. written to a hidden temporary file in the same folder (the same filesystem, so that the
   rename below is atomic), created with at most the file's mode (:data:`PRIVATE_MODE`:
   reports, labels, SRs and models hold accession numbers, ages and study dates);
2. flushed to disk (``fsync``) and its mode checked once more (a library that created the
   temporary itself may have used a wider one);
3. renamed over the final name with :func:`os.replace`, atomic on POSIX;
4. the folder flushed, so that the rename itself survives a power cut.

:func:`write` does it for bytes or text in memory; :func:`write_many` for a batch of small
files at once (the SRs of a scan: one file-system sync for the batch instead of an fsync
each); :func:`writing` for a file a library streams into (Parquet, a Keras model, an
``npz``). A run that writes several files and
must show them all at once (the scan's reports) writes them to :func:`temporary_path` s
named by the run and calls :func:`publish` on each at the end; :func:`remove_temporaries`
clears what a failed or killed run left. ``tests/test_storage.py`` fails on any other
rename in batchscan.

The one exception is :mod:`batchscan.synth`: the demo archive and the tests' DICOM files
are made-up *inputs*, written once into a folder nobody reads while it is made, thousands
at a time in the tests; there a temporary file and two fsyncs per file would cost time and
promise nothing anybody relies on.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

#: Bits every file batchscan writes goes without: the reports and the state hold accession
#: numbers, ages and study dates, so neither "other" users nor group members may change them,
#: and "other" users may not read them (0640 at most; a stricter umask wins).
PRIVATE_UMASK: Final = 0o027
#: The mode of a file batchscan writes, at most (a stricter umask takes more away).
PRIVATE_MODE: Final = 0o666 & ~PRIVATE_UMASK

_NEW: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


@contextlib.contextmanager
def private_files() -> Iterator[None]:
    """Create files readable by owner and group only while inside (the umask gains
    :data:`PRIVATE_UMASK`; restored after): for what SQLite and libraries create."""
    previous = os.umask(0)
    os.umask(previous | PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def make_private(path: Path) -> None:
    """Take the group-write and all "other" bits off an existing file (one an older release
    made 0644); never adds a bit."""
    with contextlib.suppress(OSError):
        mode = path.stat().st_mode & 0o7777
        if mode & PRIVATE_UMASK:
            path.chmod(mode & ~PRIVATE_UMASK)


def temporary_path(final: Path, token: str, suffix: str = "") -> Path:
    """The hidden temporary file that becomes `final`: ``.<name>.<token>.tmp<suffix>`` in
    the same folder. `token` names the writer (the scan's run id), so that
    :func:`remove_temporaries` finds what it left; `suffix` is for a library that insists
    on one (Keras saves only to a name ending ``.keras``)."""
    return final.with_name(f".{final.name}.{token}.tmp{suffix}")


def remove_temporaries(folder: Path, token: str | None = None) -> None:
    """Delete the temporary files that the writer `token` left in `folder` (every writer's
    when None).

    The scan calls it with the REPORT_DIR lock held: at the start of a run it clears what a
    killed run left behind; after a failure it clears its own.
    """
    pattern = f".*.{token}.tmp" if token else ".*.tmp"
    for path in folder.glob(pattern):
        path.unlink(missing_ok=True)


def publish(temporary: Path, final: Path, *, mode: int = PRIVATE_MODE) -> None:
    """Flush `temporary` to disk with at most `mode` and move it over `final` atomically,
    durably (the folder is flushed too)."""
    fd = os.open(temporary, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _at_most(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    _replace(temporary, final)


def write(
    final: Path, data: bytes | str, *, mode: int = PRIVATE_MODE, token: str | None = None
) -> None:
    """Write `data` (text as UTF-8) to `final`, all of it or nothing (see the module's
    description); the folder must exist. `token` names the temporary file (default: one
    of this call alone).

    Raises
    ------
    OSError
        The file cannot be written (a full disk, no permission); the old file, if any, is
        left as it was and no temporary file remains.
    """
    payload = memoryview(data.encode("utf-8") if isinstance(data, str) else data)
    temporary = temporary_path(final, token or _token())
    fd = os.open(temporary, _NEW, mode)
    try:
        try:
            while payload:
                payload = payload[os.write(fd, payload) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        _replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_many(
    batch: Sequence[tuple[Path, bytes]], *, token: str, mode: int = PRIVATE_MODE
) -> None:
    """Write each ``(final, data)`` of `batch` as :func:`write` would, for many small files at
    the cost of two file-system syncs instead of two fsyncs a file (an fsync costs
    milliseconds, tens on a busy disk: more than making an SR). Each file goes to its
    temporary file, then one ``syncfs`` puts every file's bytes on disk before any is
    renamed, then each is renamed into place and one more ``syncfs`` puts the renames on
    disk before the caller records them. A crash anywhere leaves whole files or temporary
    files, never part of one under its final name. The files must lie on one file system
    (one folder tree); folders are made as needed. Where the C library has no ``syncfs``
    (not Linux), each file is written with :func:`write`.

    Raises
    ------
    OSError
        A file cannot be written; the batch's temporary files are removed (files already
        renamed stay: each is whole).
    """
    written: list[tuple[Path, Path]] = []
    try:
        for final, data in batch:
            final.parent.mkdir(parents=True, exist_ok=True)
            if _SYNCFS is None:
                write(final, data, mode=mode, token=token)
                continue
            temporary = temporary_path(final, token)
            written.append((temporary, final))
            fd = os.open(temporary, _NEW, mode)
            try:
                payload = memoryview(data)
                while payload:
                    payload = payload[os.write(fd, payload) :]
            finally:
                os.close(fd)
        if not written:
            return
        _sync_file_system(written[0][1].parent)
        for temporary, final in written:
            os.replace(temporary, final)
        _sync_file_system(written[0][1].parent)
    except BaseException:
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)
        raise


def _syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2) (not in Python's os module): all of one file system's written data
    and metadata to disk in one call, or None where the C library has none."""
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_SYNCFS: Final = _syncfs()


def _sync_file_system(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _SYNCFS is not None and _SYNCFS(descriptor) != 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number), str(folder))
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def writing(final: Path, *, suffix: str = "", mode: int = PRIVATE_MODE) -> Iterator[Path]:
    """A temporary path to stream `final` into (already created with at most `mode`),
    published over `final` when the block ends without an exception and removed when it
    raises.

    Example: ``with writing(path) as temporary, temporary.open("wb") as handle:
    np.savez(handle, ...)``.
    """
    temporary = temporary_path(final, _token(), suffix)
    os.close(os.open(temporary, _NEW, mode))
    try:
        yield temporary
        publish(temporary, final, mode=mode)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _token() -> str:
    """A writer's token no other process or call shares."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _at_most(fd: int, mode: int) -> None:
    """Take off the bits of the open file `fd` that `mode` does not give; never adds one."""
    current = stat.S_IMODE(os.fstat(fd).st_mode)
    if current & ~mode:
        os.fchmod(fd, current & mode)


def _replace(temporary: Path, final: Path) -> None:
    """The one rename of batchscan: `temporary` over `final`, then the folder flushed."""
    os.replace(temporary, final)
    folder = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
