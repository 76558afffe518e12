#!/usr/bin/env python3
"""Does a lock file install the same versions every time? Installs it, as README and CI do
(``pip install --require-hashes -r requirements/LOCK.txt`` then the package with
``--no-deps --no-build-isolation``), into two fresh virtual environments one after the other,
and compares what each holds with the other and with the lock.

Usage (needs the package index; a few minutes and ~2 GB a venv for tensorflow):
    python jobs/deploy/lock_check.py [--lock ci|prod|gpu|tools] [--keep DIR]

Prints one row per environment (packages, differences from the lock, minutes) and every
difference; exit status 0 when both environments equal each other and the lock (pip itself,
which the venv brings and no lock pins, aside), 1 otherwise. The install logs stay in the
folder printed at the end when ``--keep`` names one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/, for common/

from common.venvs import (
    REQUIREMENTS,
    differences,
    install_locked,
    installed_versions,
    locked_versions,
    make_venv,
    pip,
    print_table,
)

#: What a fresh venv brings that no lock pins.
VENV_OWN = {"pip"}


def main(argv: list[str] | None = None) -> int:
    """Install the lock twice and compare; 0 when all agree."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", default="ci", choices=["ci", "prod", "gpu", "tools"])
    parser.add_argument("--keep", type=Path, help="keep the venvs and logs in this folder")
    args = parser.parse_args(argv)
    lock = locked_versions(REQUIREMENTS / f"{args.lock}.txt")
    with tempfile.TemporaryDirectory(prefix="lock-check-") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        found, rows = [], []
        for n in (1, 2):
            started = time.perf_counter()
            python = make_venv(folder / f"venv{n}")
            log = folder / f"install{n}.log"
            if args.lock == "tools":
                pip(python, "install", "--require-hashes", "-r", "requirements/tools.txt", log=log)
            else:
                install_locked(python, args.lock, log)
            have = {k: v for k, v in installed_versions(python).items() if k not in VENV_OWN}
            found.append(have)
            minutes = (time.perf_counter() - started) / 60
            rows.append(
                (f"venv{n}", str(len(have)), str(len(differences(lock, have))), f"{minutes:.1f}")
            )
        print(f"requirements/{args.lock}.txt: {len(lock)} pins")
        print_table(rows, ("environment", "packages", "differ from lock", "minutes"))
        problems = [("venv1 vs venv2", *d) for d in differences(found[0], found[1])]
        problems += [("lock vs venv1", *d) for d in differences(lock, found[0])]
        for problem in problems:
            print("  ".join(str(v) for v in problem))
        print(
            "same versions twice, equal to the lock"
            if not problems
            else f"{len(problems)} differences"
        )
        if args.keep:
            print(f"venvs and install logs in {folder}")
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
