"""``--pacs-credentials FILE``: the one secret batchscan holds for a PACS, read from a file.

Why a file: a password on the command line is in every ``ps`` listing and shell history,
and one in the config file is copied wherever the config is. The file holds one line,
``user:password`` (HTTP basic authentication, or DICOM user identity with a password) or
``Bearer TOKEN`` (an HTTP bearer token, or a DICOM JSON Web Token identity), and is read
when a source opens.

The secret never leaves this object as text: its ``repr`` hides it, messages about a bad
file name the file and what is wrong with its form, never a character of its content, and
it is handed only to the HTTP session and the DICOM association that need it.
"""

from __future__ import annotations

import base64
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from batchscan.ingest.sources import SourceConfigError

#: Largest credentials file read (a token is a few kilobytes).
_MAX_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user and password, or a bearer token (exactly one of the two forms)."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def read(cls, path: Path) -> Credentials:
        """Read a credentials file.

        Raises
        ------
        SourceConfigError
            The file cannot be read, or is not one line of one of the two forms (the
            message never quotes it).
        """
        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode):
                raise SourceConfigError(f"--pacs-credentials {path} is not a file")
            if info.st_size > _MAX_BYTES:
                raise SourceConfigError(f"--pacs-credentials {path} is larger than one line")
            raw = path.read_bytes()
        except OSError as exc:
            raise SourceConfigError(
                f"--pacs-credentials {path} cannot be read ({exc.strerror})"
            ) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SourceConfigError(f"--pacs-credentials {path} is not UTF-8 text") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) != 1:
            raise SourceConfigError(
                f"--pacs-credentials {path} must hold one line (user:password or Bearer "
                f"TOKEN), it holds {len(lines)}"
            )
        line = lines[0].strip()
        if line[:7].lower() == "bearer ":
            token = line[7:].strip()
            if not token or any(c.isspace() for c in token):
                raise SourceConfigError(f"--pacs-credentials {path}: a Bearer line needs one token")
            return cls(token=token)
        user, colon, password = line.partition(":")
        if not colon or not user:
            raise SourceConfigError(
                f"--pacs-credentials {path} must be user:password or Bearer TOKEN"
            )
        return cls(user=user, password=password)

    @classmethod
    def from_file(cls, path: Path | None) -> Credentials | None:
        """:meth:`read` when a file is named, None otherwise."""
        return None if path is None else cls.read(path)

    def authorization(self) -> str:
        """The HTTP ``Authorization`` header value."""
        if self.token is not None:
            return f"Bearer {self.token}"
        pair = f"{self.user}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def secrets(self) -> list[str]:
        """Every form in which the secret could leak (for the checks that it does not)."""
        found = [s for s in (self.password, self.token) if s]
        if self.user is not None:
            found.append(self.authorization().split(" ", 1)[1])
        return found
