#!/usr/bin/env python3
"""What would the newest releases change, and break? Run before ``bash requirements/lock.sh
--upgrade``, so that a refresh of the lock is a decision and not a surprise; not part of CI.

Installs the package with the test, ray and docs extras into a fresh virtual environment
*without* the lock (pip takes the newest releases pyproject allows, and of its build
backend, which the lock holds too), lists every package
whose version differs from requirements/ci.txt (``*``: one of ``batchscan.SCORE_PACKAGES``,
whose versions every score records), then runs README's test steps there, each on its own:
``ruff check``, ``mkdocs build --strict`` and ``pytest`` (the input digests and recorded
scores tests fail when a release changes what the model receives or gives for a film).

Usage (needs the package index; ~2 GB and some minutes to install, then the suite):
    python jobs/deploy/newest_releases.py [--keep DIR] [--pytest-args "-x tests/test_model.py"]

Prints the moved packages, one line per step with its outcome and minutes, and every failing
test with its first line; exit status 0 when every step passes on the newest releases, 1
otherwise.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/, for common/
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # the repository, for batchscan

from common.venvs import (
    REQUIREMENTS,
    ROOT,
    differences,
    installed_versions,
    locked_versions,
    make_venv,
    normalized,
    pip,
    print_table,
)

from batchscan import SCORE_PACKAGES

EXTRAS = "test,ray,docs"


def steps(python: Path, junit: Path, pytest_args: list[str]) -> dict[str, list[str]]:
    """README's test steps after the install, run with the venv's tools."""
    bin_dir = python.parent
    return {
        "ruff": [str(bin_dir / "ruff"), "check", "batchscan", "jobs", "tests"],
        "mkdocs": [
            str(bin_dir / "mkdocs"),
            "build",
            "--strict",
            "--site-dir",
            str(junit.parent / "site"),
        ],
        "pytest": [str(python), "-m", "pytest", "-q", f"--junitxml={junit}", *pytest_args],
    }


def failures(junit: Path) -> list[tuple[str, str]]:
    """(test id, first line of its failure) of every failed or erroring test in `junit`."""
    if not junit.is_file():
        return []
    found = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for problem in (*case.findall("failure"), *case.findall("error")):
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            found.append(
                (f"{case.get('classname')}::{case.get('name')}", (message or [""])[0][:160])
            )
    return found


def main(argv: list[str] | None = None) -> int:
    """Install the newest releases, compare with the lock, run the test steps."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="keep the venv and the logs in this folder")
    parser.add_argument("--pytest-args", default="", help="arguments for pytest (default: all)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="newest-releases-") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        python = make_venv(folder / "venv")
        build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
        pip(python, "install", "--upgrade", "pip", *build, log=folder / "install.log")
        pip(python, "install", "--upgrade", f".[{EXTRAS}]", log=folder / "install.log")
        install_minutes = (time.perf_counter() - started) / 60
        lock = locked_versions(REQUIREMENTS / "ci.txt")
        newest = installed_versions(python)
        recorded = {normalized(n) for n in SCORE_PACKAGES}
        moved = [
            (("* " if name in recorded else "  ") + name, locked or "-", now or "-")
            for name, locked, now in differences(lock, newest)
            if name != "pip"
        ]
        print(f"installed the newest releases of .[{EXTRAS}] in {install_minutes:.1f} min")
        print_table(moved, ("package (* recorded with every score)", "locked", "newest"))
        junit = folder / "pytest.xml"
        rows, failed = [], False
        for name, command in steps(python, junit, shlex.split(args.pytest_args)).items():
            clock = time.perf_counter()
            with open(folder / f"{name}.log", "w") as log:
                code = subprocess.run(
                    command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
                ).returncode
            failed |= code != 0
            rows.append(
                (
                    name,
                    "ok" if code == 0 else f"FAILED ({code})",
                    f"{(time.perf_counter() - clock) / 60:.1f}",
                )
            )
        print_table(rows, ("step", "outcome", "minutes"))
        for test, message in failures(junit):
            print(f"failed: {test}: {message}")
        if args.keep:
            print(f"venv and logs (install, ruff, mkdocs, pytest) in {folder}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
