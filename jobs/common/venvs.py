"""Fresh virtual environments installed from the lock files or from the newest releases,
and what each holds: for jobs/deploy/lock_check.py (does the lock install the same versions
every time?), jobs/deploy/newest_releases.py (what would a refresh change, and break?) and
tests/test_packaging.py (does each lock pin what pyproject asks for?).

The lock files are requirements/*.txt, written by ``bash requirements/lock.sh`` (uv pip
compile with hashes); they install with stock pip, as README, CI and the Dockerfile do
(:data:`LOCKED_INSTALL`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements"
#: How README, CI and the image install: the lock with its hashes, then the package alone,
#: built by the locked setuptools (nothing unpinned is fetched).
LOCKED_INSTALL = (
    "pip install --require-hashes -r requirements/{lock}.txt && "
    "pip install --no-deps --no-build-isolation ."
)
_PIN = re.compile(r"([A-Za-z0-9_.\-]+)==(\S+)")


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Pillow`` and ``pillow`` alike)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path) -> dict[str, str]:
    """The pins of a lock file by normalized name.

    Raises
    ------
    ValueError
        A pin without its sha256 hashes (``pip install --require-hashes`` would refuse the
        whole file).
    """
    pins: dict[str, str] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", lock.read_text()):
        found = _PIN.match(block)
        if found is None:
            continue
        if "--hash=sha256:" not in block:
            raise ValueError(f"{lock.name} pins {found.group(1)} without a hash")
        pins[normalized(found.group(1))] = found.group(2)
    return pins


def make_venv(folder: Path) -> Path:
    """A fresh virtual environment in `folder` (with pip, as ``python3 -m venv``); returns
    its Python."""
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    return folder / "bin" / "python"


def pip(python: Path, *args: str, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m pip ARGS`` from the repository root, its output appended to `log` (if
    given); raises CalledProcessError when pip fails."""
    with open(log or "/dev/null", "a") as out:
        return subprocess.run(
            [str(python), "-m", "pip", "--disable-pip-version-check", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            check=True,
        )


def install_locked(python: Path, lock: str, log: Path | None = None) -> None:
    """Install ``requirements/<lock>.txt`` and then the package, as :data:`LOCKED_INSTALL`."""
    pip(python, "install", "--require-hashes", "-r", f"requirements/{lock}.txt", log=log)
    pip(python, "install", "--no-deps", "--no-build-isolation", ".", log=log)


def installed_versions(python: Path) -> dict[str, str]:
    """Every distribution installed in the environment of `python`, by normalized name
    (batchscan itself left out)."""
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    found = json.loads(
        subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    )
    return {normalized(k): v for k, v in found.items() if normalized(k) != "batchscan"}


def differences(a: dict[str, str], b: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    """(name, version in `a`, version in `b`) of every package the two do not agree on."""
    return [(n, a.get(n), b.get(n)) for n in sorted(a.keys() | b.keys()) if a.get(n) != b.get(n)]


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    """A plain fixed-width table on stdout."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    sys.stdout.flush()
