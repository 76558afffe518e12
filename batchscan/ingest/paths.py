"""File names as an archive really has them: any bytes, any length.

Two facts of real archives that a path string in Python does not survive by itself:

* **Names that are not UTF-8.** Archives copied from old Windows or Samba shares hold names
  in Latin-1 or a code page (``caf\\xe9``). Python represents such a name losslessly as a
  ``str`` with *surrogate escapes* (:func:`os.fsdecode`), which can open the file but cannot
  be encoded as UTF-8: SQLite, Parquet and a UTF-8 terminal refuse it. So in memory a path
  stays the surrogate-escaped ``str``; the state stores it as TEXT when it is valid UTF-8 and
  as a BLOB of its exact bytes otherwise (:func:`state_key` / :func:`from_state`, so no two
  names can collide), and the reports show :func:`readable` (each byte that is not UTF-8
  written ``\\xHH``) next to the exact bytes (:func:`raw_bytes`).
* **Paths longer than PATH_MAX** (4,096 bytes on Linux). Such a file can only be reached
  from a directory descriptor near it, as :func:`os.fwalk` does: discovery walks with
  descriptors, and :func:`open_binary` / :func:`stat` fall back to opening the path one
  folder at a time when the kernel says ``ENAMETOOLONG``.
"""

from __future__ import annotations

import errno
import os
from typing import BinaryIO


def readable(text: str) -> str:
    """`text` as valid UTF-8: each surrogate-escaped byte as ``\\xHH``, other unpaired
    surrogates as ``\\udXXX``; valid text (the usual case) comes back unchanged."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def raw_bytes(path: str) -> bytes | None:
    """The exact bytes of a name that is not valid UTF-8; None for a UTF-8 name (whose
    ``path`` column is already exact)."""
    if path.isascii():
        return None
    try:
        path.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return os.fsencode(path)


def state_key(path: str) -> str | bytes:
    """How the state stores a path: the text itself, or its bytes (a BLOB) when it is not
    valid UTF-8. SQLite never equates TEXT and BLOB, so the two kinds cannot collide."""
    exact = raw_bytes(path)
    return path if exact is None else exact


def from_state(value: str | bytes) -> str:
    """The in-memory path of a value :func:`state_key` stored."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _open_parent(path: str) -> tuple[int, str]:
    """A descriptor of `path`'s folder, opened one component at a time, and the last name.

    Used only for paths the kernel refuses as too long: each step is a short name opened
    relative to the descriptor of the step before.
    """
    head, name = os.path.split(path)
    fd = os.open("/" if os.path.isabs(path) else ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in head.split(os.sep):
            if part:
                step = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def open_binary(path: str) -> BinaryIO:
    """Open a file for reading, whatever the length of its path."""
    try:
        return open(path, "rb")
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    parent, name = _open_parent(path)
    try:
        fd = os.open(name, os.O_RDONLY, dir_fd=parent)
    finally:
        os.close(parent)
    return os.fdopen(fd, "rb")


def stat(path: str) -> os.stat_result:
    """:func:`os.stat` (following links), whatever the length of the path."""
    try:
        return os.stat(path)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    parent, name = _open_parent(path)
    try:
        return os.stat(name, dir_fd=parent)
    finally:
        os.close(parent)
