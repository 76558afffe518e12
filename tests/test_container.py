"""The image, built from the Dockerfile and run for real: it scores the demo archive as the
host does, reads nothing again on a second night, and carries the SBOM of what it installed.

No image registry is reachable from CI, so the base is made here: a Debian bookworm root
filesystem with python3 and python3-venv, made by mmdebstrap and loaded with ``podman
import``; the image is then built on it with ``podman build --build-arg BASE=...``, which
installs the lock from the package index. Needs root with podman, runc and mmdebstrap (Debian
packages, installed by tests/debian-tools.sh in CI); elsewhere the test is skipped with the
reason.

What podman needs on these machines (the same flags are in docs/install.md):

* ``--runtime runc``: crun, which Debian's podman pulls in by default, refuses the hybrid
  cgroups (v1 controllers with a v2 mount) of this kernel; no systemd runs, so
  ``--cgroup-manager cgroupfs`` and ``--events-backend file`` (podman would ask systemd and
  journald);
* ``--ulimit nofile=1024:1024 --ulimit nproc=4096:4096``: podman's default limits exceed the
  sandbox's, and runc refuses to set them ("error setting rlimit");
* the build's ``RUN pip install`` needs ``--network host`` and the host's CA bundle
  (``-v /etc/ssl/certs:/etc/ssl/certs:ro``: the package index is reached through a TLS proxy
  whose certificate only the host trusts); the scans run with ``--network none``;
* storage: podman's default, overlay, works on these machines' ext4 (``podman info``:
  ``Native Overlay Diff: true``); where it does not, ``--storage-driver vfs`` does, at the
  cost of a full copy of the tree per layer.

The base is kept between runs (a tar file under the user's cache folder, keyed by what
mmdebstrap is asked for, and the imported image); the build reuses podman's layer cache, so
a rerun with the same locks rebuilds only the layers of the code. CI starts clean: on a busy
2-core machine the base took 3 minutes, the build 10 and the whole file 15; with the base and
the image cached, 2 (docs/install.md has the figures).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from common.venvs import locked_versions, normalized

from batchscan.cli import main
from batchscan.synth import write_demo_archive

ROOT = Path(__file__).resolve().parents[1]
#: What the base is made of: mmdebstrap's arguments after the options.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
#: podman's global flags on these machines (module docstring).
PODMAN = ("podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file")
LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
IMAGE = "localhost/batchscan-test:latest"
SBOM = "/usr/share/doc/batchscan/sbom.cdx.json"
#: How far a score in the image may lie from the host's (tests/test_recorded_scores.py).
SCORE_TOLERANCE = 1e-5

pytestmark = [pytest.mark.slow, pytest.mark.container]


def _missing() -> str | None:
    """Why the image cannot be built here, or None."""
    if os.geteuid() != 0:
        return "not root: podman import and mmdebstrap need root here"
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install podman runc mmdebstrap)"
    return None


def _run(*command: str, nice: bool = False, **kwargs: object) -> subprocess.CompletedProcess:
    """Run a command, its output kept; a failure shows the command and the output's end."""
    done = subprocess.run(
        [*(("nice", "-n", "10") if nice else ()), *command],
        capture_output=True,
        text=True,
        **kwargs,  # type: ignore[call-overload]
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command[:6])}... exited {done.returncode}:\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
    return done


def _cache() -> Path:
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "batchscan-tests"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _has_image(name: str) -> bool:
    return subprocess.run([*PODMAN, "image", "exists", name], capture_output=True).returncode == 0


def _base() -> str:
    """The imported Debian base, made once per content of :data:`BASE_PACKAGES`."""
    arguments = ("--variant=apt", f"--include={','.join(BASE_PACKAGES)}", BASE_SUITE)
    key = hashlib.sha256(" ".join(arguments).encode()).hexdigest()[:12]
    name = f"localhost/batchscan-test-base:{key}"
    if _has_image(name):
        return name
    tar = _cache() / f"debian-{BASE_SUITE}-{key}.tar"
    clock = time.perf_counter()
    if not tar.is_file():
        partial = tar.with_suffix(".partial.tar")
        _run("mmdebstrap", "--quiet", *arguments, str(partial), nice=True)
        partial.rename(tar)
        print(f"image step: mmdebstrap {time.perf_counter() - clock:.0f} s")
    _run(*PODMAN, "import", str(tar), name, nice=True)
    print(f"image step: base made and imported {time.perf_counter() - clock:.0f} s")
    return name


def _locked_wheels() -> Path:
    """The files of the image's locks (prod.txt and tools.txt), fetched on the host by pip,
    checked against the locks' hashes, into a folder the build mounts: pip on the host takes
    them from its cache, which CI's own install of requirements/ci.txt (the same versions)
    has just filled, so the build downloads nothing and unpacks TensorFlow once. The image's
    Python (Debian bookworm's 3.11) takes the same wheels as the host's."""
    wheels = _cache() / "wheels"
    clock = time.perf_counter()
    for lock in ("prod.txt", "tools.txt"):
        _run(
            sys.executable, "-m", "pip", "download", "--quiet", "--require-hashes", "--no-deps",
            "--only-binary=:all:", "-d", str(wheels), "-r", str(ROOT / "requirements" / lock),
            nice=True,
        )  # fmt: skip
    print(f"image step: the locked wheels fetched on the host {time.perf_counter() - clock:.0f} s")
    return wheels


@pytest.fixture(scope="module")
def image() -> str:
    """The image of the Dockerfile on the mmdebstrap base (podman's layer cache reused)."""
    missing = _missing()
    if missing:
        pytest.skip(missing)
    base = _base()
    old = subprocess.run(
        [*PODMAN, "image", "inspect", "--format", "{{.Id}}", IMAGE], capture_output=True, text=True
    ).stdout.strip()
    clock = time.perf_counter()
    wheels = _locked_wheels()
    _run(
        *PODMAN, "build", "--network", "host", "-v", "/etc/ssl/certs:/etc/ssl/certs:ro",
        "-v", f"{wheels}:/wheels:ro", "--build-arg", "PIP_NO_INDEX=1",
        "--build-arg", "PIP_FIND_LINKS=/wheels",
        *LIMITS, "--build-arg", f"BASE={base}", "-t", IMAGE, str(ROOT),
        nice=True,
    )  # fmt: skip
    print(f"image step: podman build {time.perf_counter() - clock:.0f} s")
    new = _run(*PODMAN, "image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    if old and old != new:  # the image this test built before, now untagged
        subprocess.run([*PODMAN, "rmi", old], capture_output=True)
    return IMAGE


@pytest.fixture
def volume() -> Iterator[tuple[str, Path]]:
    """A podman volume for the reports, and where the host sees its files."""
    name = f"batchscan-test-{uuid.uuid4().hex[:8]}"
    _run(*PODMAN, "volume", "create", name)
    try:
        place = _run(*PODMAN, "volume", "inspect", "--format", "{{.Mountpoint}}", name)
        yield name, Path(place.stdout.strip())
    finally:
        subprocess.run([*PODMAN, "volume", "rm", "--force", name], capture_output=True)


def _in_image(image: str, *arguments: str, mounts: tuple[str, ...] = ()) -> str:
    """``batchscan ARGUMENTS`` in the image as its user, without a network and with a
    read-only root filesystem (``/tmp`` a tmpfs, as the Kubernetes CronJob has it); its
    stdout."""
    command = (*PODMAN, "run", "--rm", "--network", "none", "--read-only", *LIMITS, *mounts)
    clock = time.perf_counter()
    said = _run(*command, image, *arguments, nice=True).stdout
    print(f"image step: batchscan {arguments[0]} in the image {time.perf_counter() - clock:.0f} s")
    return said


def test_the_image_scores_the_demo_archive_as_the_host_and_reads_nothing_again(
    image: str, volume: tuple[str, Path], tmp_path: Path
) -> None:
    archive, host = tmp_path / "archive", tmp_path / "host"
    write_demo_archive(archive)  # what README's first command scans
    for folder in (archive, *archive.rglob("*")):  # the image's user is not the owner
        folder.chmod(folder.stat().st_mode | (0o555 if folder.is_dir() else 0o444))
    clock = time.perf_counter()
    assert main(["scan", str(archive), "--out", str(host), "--no-progress"]) == 0
    print(f"image step: the host's scan {time.perf_counter() - clock:.0f} s")
    name, reports = volume
    mounts = ("-v", f"{archive}:/archive:ro", "-v", f"{name}:/reports")
    scan = ("scan", "/archive", "--out", "/reports", "--no-progress")
    first = _in_image(image, *scan, mounts=mounts)
    assert "17 new or changed" in first, first

    theirs = pd.read_csv(reports / "studies.csv").set_index("study_instance_uid").sort_index()
    mine = pd.read_csv(host / "studies.csv").set_index("study_instance_uid").sort_index()
    assert len(mine) == 6 and list(theirs.index) == list(mine.index)
    assert np.abs(theirs["score"] - mine["score"]).max() <= SCORE_TOLERANCE
    pd.testing.assert_frame_equal(theirs.drop(columns="score"), mine.drop(columns="score"))
    in_image = pd.read_parquet(reports / "images.parquet").set_index("path").sort_index()
    on_host = pd.read_parquet(host / "images.parquet").set_index("path").sort_index()
    kept = ["status", "reason", "decoder", "sop_instance_uid"]
    pd.testing.assert_frame_equal(in_image[kept], on_host[kept])

    manifest = json.loads((reports / "manifest.json").read_text())
    locked = locked_versions(ROOT / "requirements" / "prod.txt")
    for package, found in manifest["versions"].items():
        if package != "python":
            assert found == locked[package], f"the image's {package} is not the locked one"
    assert manifest["engine"]["device"].startswith("CPU (")

    second = _in_image(image, *scan, mounts=mounts)
    assert "0 new or changed, 17 unchanged" in second, second


def test_the_image_carries_the_sbom_of_its_locked_environment(image: str) -> None:
    sbom = json.loads(
        _run(*PODMAN, "run", "--rm", *LIMITS, "--entrypoint", "cat", image, SBOM).stdout
    )
    assert sbom["bomFormat"] == "CycloneDX"
    components = {normalized(c["name"]): c.get("version") for c in sbom["components"]}
    locked = locked_versions(ROOT / "requirements" / "prod.txt")
    assert components["tensorflow"] == locked["tensorflow"]
    assert {n: components.get(n) for n in locked} == locked, "every locked package, as locked"


def test_the_image_runs_as_a_user_who_cannot_change_its_installation(image: str) -> None:
    """Its user is not root, and cannot write into its own installation either."""
    said = _run(
        *PODMAN, "run", "--rm", *LIMITS, "--entrypoint", "sh", image, "-c",
        "id -u; touch /opt/batchscan/x 2>/dev/null && echo writable || echo read-only",
    ).stdout.split()  # fmt: skip
    assert said[0] != "0" and said[1] == "read-only"
