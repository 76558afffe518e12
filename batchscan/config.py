"""The optional TOML configuration file of ``batchscan scan --config PATH`` and ``batchscan
send --config PATH``: one file for both.

A cron entry or systemd unit is easier to keep right with the archive, the report folder and
the options in one reviewed file. Its keys are those :mod:`batchscan.options` declares (the
long name of a command-line option, ``batch_size`` for ``--batch-size``, unless the option
names another); each command takes the keys of its own options and leaves the others to the
command they are for; options given on the command line win over the file. Relative paths
are taken relative to the file's folder, so a config moved with its reports keeps working. A
key that no command knows, or a bad value, is refused with the key named (exit status 2): a
typo must not silently fall back to a default. ``jobs/deploy/cron/batchscan.example.toml``
lists every key with its help.

The pseudonymisation key (:func:`pseudonym_key`) is read here too: from the file named by
``pseudonym_key_file`` or ``--pseudonym-key-file``, else from ``BATCHSCAN_PSEUDONYM_KEY``.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any, Final

from batchscan import options


class ConfigError(ValueError):
    """The configuration file cannot be used (exit status 2)."""


_TYPE_NAMES: Final = {str: "a string", int: "an integer", float: "a number", bool: "true/false"}


def load_config(path: Path) -> dict[str, Any]:
    """Read and check a config file; returns the values by key (:func:`options.config_keys`:
    the keys of every command that reads ``--config``), paths made absolute.

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
    keys = options.config_keys()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in keys:
            raise ConfigError(
                f"config {path}: unknown key {key!r} (known: {', '.join(sorted(keys))})"
            )
        try:
            values[key] = _value(keys[key], value, path.parent)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"config {path}: key {key!r}: {exc}") from exc
        except TypeError as exc:
            raise ConfigError(f"config {path}: key {key!r} must be {exc}") from exc
    return values


def _value(option: options.Option, value: Any, folder: Path) -> Any:
    """The option's value from its TOML value, checked as on the command line.

    Raises ``TypeError`` (the TOML type wanted) or ``argparse.ArgumentTypeError``."""
    kind = option.kind.toml
    is_kind = (
        isinstance(value, int | float) and not isinstance(value, bool)
        if kind is float
        else isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    )
    if not is_kind:
        raise TypeError(_TYPE_NAMES[kind])
    if option.choices and value not in option.choices:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(option.choices)}: {value!r}")
    parse = option.kind.parse
    converted = value if parse is None or kind is bool else parse(str(value))
    if option.kind.path and isinstance(converted, Path):  # a URL stays as it is
        return (folder / converted).absolute()
    return converted


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
        key = os.environ.get(options.PSEUDONYM_KEY_ENV, "").strip().encode()
        source = options.PSEUDONYM_KEY_ENV
        if not key:
            return None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"pseudonym key in {source} is shorter than {MIN_KEY_BYTES} bytes")
    return key
