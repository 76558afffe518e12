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
from typing import Final

from batchscan.ingest.records import ImageRecord


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


#: Flags that open a folder for listing (following a symlink to it, as the walk does).
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY


def iter_files(root: Path | str) -> Iterator[ImageRecord]:
    """Yield one record per file below `root`, depth first, as the walk proceeds.

    Regular files (and symlinks to them) come out ``pending`` with size and mtime set;
    everything that cannot be a readable file comes out already ``skipped`` or ``failed``.

    The walk holds a descriptor per open folder and lists, stats and descends relative to
    it (as :func:`os.fwalk` does), so a file whose full path is longer than PATH_MAX still
    gets its own row; the stages then open it with :func:`batchscan.ingest.paths.open_binary`.

    Parameters
    ----------
    root:
        The archive folder. It must exist and be readable (the caller checks, so that a
        missing archive is a usage error, not a report row).
    """
    top = os.path.abspath(root)
    top_stat = os.stat(top)
    walked: set[tuple[int, int]] = {(top_stat.st_dev, top_stat.st_ino)}
    # Each level: (absolute path, path relative to the root with a trailing "/" or "",
    # its descriptor, its scandir iterator); `ancestors` holds their (dev, ino).
    stack: list[tuple[str, str, int, Iterator[os.DirEntry[str]]]] = []
    ancestors: list[tuple[int, int]] = []

    def open_dir(
        path: str, rel: str, key: tuple[int, int], parent: int | None, name: str
    ) -> ImageRecord | None:
        try:
            fd = os.open(name if parent is not None else path, _DIR_FLAGS, dir_fd=parent)
            try:
                iterator = os.scandir(fd)
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            return ImageRecord(path=rel or "./", abs_path=path).fail(
                f"unreadable_dir:{_errno_reason(exc)}", str(exc.strerror)
            )
        stack.append((path, rel, fd, iterator))
        ancestors.append(key)
        return None

    failure = open_dir(top, "", (top_stat.st_dev, top_stat.st_ino), None, top)
    if failure is not None:
        yield failure
        return

    while stack:
        path, rel, fd, iterator = stack[-1]
        try:
            entry = next(iterator, None)
        except OSError as exc:  # a directory that fails half-way through its listing
            entry = None
            yield ImageRecord(path=rel or "./", abs_path=path).fail(
                f"unreadable_dir:{_errno_reason(exc)}", str(exc.strerror)
            )
        if entry is None:
            stack.pop()
            ancestors.pop()
            iterator.close()  # type: ignore[attr-defined]
            os.close(fd)
            continue
        name = entry.name
        record = ImageRecord(path=rel + name, abs_path=f"{path}/{name}")
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
                failure = open_dir(record.abs_path, record.path + "/", key, fd, name)
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
