"""Discovery: stream every file under the archive root as an :class:`ImageRecord`.

Archives hold millions of files, so the walk is a generator over ``os.scandir`` iterators
(one open iterator per directory level): the first file reaches the decoders while the walk
is still running, and memory does not grow with the number of files. File names are never
used to guess the type (DICOM files often have no extension); the header pass decides.

What cannot be walked is recorded rather than raised: an unreadable folder or file, a broken
symlink, a device or FIFO (opening a FIFO would hang the job), a directory symlink that loops
back onto one of its ancestors or onto a folder already walked.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from batchscan.records import ImageRecord


def _errno_reason(exc: OSError) -> str:
    """``permission_denied``, ``not_found``... for an OSError, the errno name otherwise."""
    names = {
        errno.EACCES: "permission_denied",
        errno.EPERM: "permission_denied",
        errno.ENOENT: "not_found",
        errno.ELOOP: "symlink_loop",
        errno.ENAMETOOLONG: "name_too_long",
    }
    if exc.errno in names:
        return names[exc.errno]
    return errno.errorcode.get(exc.errno or 0, "os_error").lower()


def _relative(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)
    return rel.replace(os.sep, "/")


def iter_files(root: Path | str) -> Iterator[ImageRecord]:
    """Yield one record per file below `root`, depth first, as the walk proceeds.

    Regular files (and symlinks to them) come out ``pending`` with size and mtime set;
    everything that cannot be a readable file comes out already ``skipped`` or ``failed``.

    Parameters
    ----------
    root:
        The archive folder. It must exist and be readable (the caller checks, so that a
        missing archive is a usage error, not a report row).
    """
    top = os.path.abspath(root)
    top_stat = os.stat(top)
    walked: set[tuple[int, int]] = {(top_stat.st_dev, top_stat.st_ino)}
    # Each level: (directory path, its scandir iterator, its (dev, ino) for loop detection)
    stack: list[tuple[str, Iterator[os.DirEntry[str]], tuple[int, int]]] = []
    ancestors: list[tuple[int, int]] = []

    def open_dir(path: str, key: tuple[int, int]) -> ImageRecord | None:
        try:
            iterator = os.scandir(path)
        except OSError as exc:
            return ImageRecord(path=_relative(top, path) + "/", abs_path=path).fail(
                f"unreadable_dir:{_errno_reason(exc)}", str(exc.strerror)
            )
        stack.append((path, iterator, key))
        ancestors.append(key)
        return None

    failure = open_dir(top, (top_stat.st_dev, top_stat.st_ino))
    if failure is not None:
        yield failure
        return

    while stack:
        path, iterator, _ = stack[-1]
        try:
            entry = next(iterator, None)
        except OSError as exc:  # a directory that fails half-way through its listing
            entry = None
            yield ImageRecord(path=_relative(top, path) + "/", abs_path=path).fail(
                f"unreadable_dir:{_errno_reason(exc)}", str(exc.strerror)
            )
        if entry is None:
            stack.pop()
            ancestors.pop()
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            continue
        record = ImageRecord(path=_relative(top, entry.path), abs_path=entry.path)
        try:
            info = entry.stat(follow_symlinks=True)
        except OSError as exc:
            if entry.is_symlink():
                reason = "symlink_loop" if exc.errno == errno.ELOOP else "broken_symlink"
                yield record.fail(reason, str(exc.strerror))
            else:
                yield record.fail(f"unreadable:{_errno_reason(exc)}", str(exc.strerror))
            continue
        if stat.S_ISDIR(info.st_mode):
            key = (info.st_dev, info.st_ino)
            if key in ancestors:
                yield record.skip("symlink_loop", "directory link back to one of its ancestors")
            elif key in walked:
                yield record.skip("duplicate_dir", "directory already walked through another path")
            else:
                walked.add(key)
                failure = open_dir(entry.path, key)
                if failure is not None:
                    yield failure
            continue
        record.size, record.mtime_ns = info.st_size, info.st_mtime_ns
        if not stat.S_ISREG(info.st_mode):
            yield record.skip("not_regular_file")
        elif info.st_size == 0:
            yield record.skip("empty_file")
        else:
            yield record
