"""The optional TOML configuration file of ``batchscan scan --config PATH``.

A cron entry or systemd unit is easier to keep right with the archive, the report folder and
the options in one reviewed file. Every key is the long name of a command-line option
(``batch_size`` for ``--batch-size``); options given on the command line win over the file.
Relative paths are taken relative to the file's folder, so a config moved with its reports
keeps working. Anything not understood is refused with the key named (exit status 2): a typo
must not silently fall back to a default.

The pseudonymisation key (:func:`pseudonym_key`) is read here too: from the file named by
``pseudonym_key_file`` or ``--pseudonym-key-file``, else from ``BATCHSCAN_PSEUDONYM_KEY``.

Example::

    archive = "/mnt/pacs-export"
    out = "/var/lib/batchscan/reports"
    workers = 6
    file_timeout = 300
    pseudonym_key_file = "/etc/batchscan/pseudonym.key"
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final


class ConfigError(ValueError):
    """The configuration file cannot be used (exit status 2)."""


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`, with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}: {text}")
        return value

    return parse


def seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(allowed)}: {text!r}")
        return text

    return parse


#: key -> (TOML type, converter to the option's value). Paths become absolute later.
KEYS: Final[dict[str, tuple[type, Callable[[Any], Any]]]] = {
    "archive": (str, Path),
    "out": (str, Path),
    "state": (str, Path),
    "model": (str, Path),
    "pseudonym_key_file": (str, Path),
    "batch_size": (int, int_at_least(1)),
    "workers": (int, int_at_least(0)),
    "max_pixel_bytes": (int, int_at_least(1)),
    "file_timeout": (float, seconds),
    "engine": (str, _choice("local", "ray")),
    "ray_address": (str, str),
    "precision": (str, _choice("auto", "float32", "mixed")),
    "all_modalities": (bool, bool),
    "full_resolution": (bool, bool),
    "no_xla": (bool, bool),
    "no_progress": (bool, bool),
    "sr_out": (str, Path),
    "shadow_model": (str, Path),
    "reports_file": (str, Path),
    "monitor_period": (str, _choice("week", "month")),
    "send_to": (str, str),
    "calling_aet": (str, str),
    "tls_ca": (str, Path),
    "tls_cert": (str, Path),
    "tls_key": (str, Path),
}
_PATH_KEYS: Final = {
    "archive",
    "out",
    "state",
    "model",
    "pseudonym_key_file",
    "sr_out",
    "shadow_model",
    "reports_file",
    "tls_ca",
    "tls_cert",
    "tls_key",
}
_TYPE_NAMES: Final = {str: "a string", int: "an integer", float: "a number", bool: "true/false"}


def load_config(path: Path) -> dict[str, Any]:
    """Read and check a config file; returns option values keyed like argparse's dests.

    Raises
    ------
    ConfigError
        The file is missing or not TOML, or a key is unknown or has a bad value; the message
        names the file and the key.
    """
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML ({exc})") from exc
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in KEYS:
            raise ConfigError(
                f"config {path}: unknown key {key!r} (known: {', '.join(sorted(KEYS))})"
            )
        kind, convert = KEYS[key]
        is_kind = (
            isinstance(value, int | float) and not isinstance(value, bool)
            if kind is float
            else isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        )
        if not is_kind:
            raise ConfigError(f"config {path}: key {key!r} must be {_TYPE_NAMES[kind]}")
        try:
            converted = convert(value if kind in (bool, str) else str(value))
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"config {path}: key {key!r}: {exc}") from exc
        if key in _PATH_KEYS:
            converted = (path.parent / converted).absolute()
        values[key] = converted
    return values


#: Shortest pseudonymisation key accepted: a short key could be guessed, and with it every
#: patient_key mapped back to a PatientID by trying IDs.
MIN_KEY_BYTES: Final = 16


def pseudonym_key(key_file: Path | None) -> bytes | None:
    """The pseudonymisation key: the file's bytes (surrounding whitespace stripped), else
    ``BATCHSCAN_PSEUDONYM_KEY``, else None (no patient_key column).

    Raises
    ------
    ConfigError
        The key file cannot be read, or the key is shorter than :data:`MIN_KEY_BYTES`.
    """
    if key_file is not None:
        try:
            key = key_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read pseudonym key file {key_file}: {exc.strerror}") from exc
        source = str(key_file)
    else:
        key = os.environ.get("BATCHSCAN_PSEUDONYM_KEY", "").strip().encode()
        source = "BATCHSCAN_PSEUDONYM_KEY"
        if not key:
            return None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"pseudonym key in {source} is shorter than {MIN_KEY_BYTES} bytes")
    return key
