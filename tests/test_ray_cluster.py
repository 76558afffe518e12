"""``--engine ray`` on a real multi-node cluster started with ``ray start``, with token
authentication: the reports equal the local engine's, a lost node or a killed driver loses
nothing, and a wrong token or another release on a node is refused with one line.

Each cluster lives in a network namespace the test makes, with only its loopback up
(jobs/bench/ray_cluster_check.py: NetnsCluster): a head with no CPUs for work and worker nodes of
one CPU, each its own raylet; traffic never leaves 127.0.0.1 of that namespace, and the
test ends exactly the processes of its namespaces. Skipped, with the reason, where
namespaces cannot be made (not root); CI runs as root.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import load_job

pytest.importorskip("ray")
cluster_job = load_job("common/netns_cluster")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        cluster_job.namespaces_possible() is not None,
        reason=str(cluster_job.namespaces_possible()),
    ),
]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo archive (every kind of file) and 160 more studies, so a run lasts long
    enough to lose a node in the middle of it."""
    from batchscan.synth import write_demo_archive

    root = tmp_path_factory.mktemp("cluster") / "archive"
    write_demo_archive(root / "demo", size=256, studies=6)
    cluster_job.write_archive(root / "more", 160)
    return root


@pytest.fixture(scope="module")
def local(archive: Path) -> Path:
    """The local engine's reports of the archive: what every cluster run must equal."""
    from batchscan.cli import main

    out = archive.parent / "local"
    assert main(["scan", str(archive), "--out", str(out), "--workers", "2", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def cluster():
    with cluster_job.NetnsCluster(f"bst{os.getpid()}", workers=2) as started:
        yield started


def _scan(cluster, archive: Path, out: Path) -> list[str]:
    return [
        str(cluster_job.BIN / "batchscan"),
        "scan",
        str(archive),
        "--out",
        str(out),
        "--engine",
        "ray",
        "--ray-address",
        cluster.address,
        "--no-progress",
    ]


def assert_same_reports(out: Path, local: Path) -> None:
    """Every file one row with the same status, reason and score (1e-6), the same studies."""
    mine = pd.read_parquet(out / "images.parquet").set_index("path").sort_index()
    theirs = pd.read_parquet(local / "images.parquet").set_index("path").sort_index()
    assert mine.index.is_unique and mine.index.equals(theirs.index)
    for column in ("status", "reason", "study_instance_uid"):
        assert mine[column].fillna("").equals(theirs[column].fillna("")), column
    assert np.allclose(mine["score"], theirs["score"], atol=1e-6, equal_nan=True)
    a = pd.read_parquet(out / "studies.parquet").set_index("study_instance_uid").sort_index()
    b = pd.read_parquet(local / "studies.parquet").set_index("study_instance_uid").sort_index()
    assert a.index.equals(b.index)
    assert np.allclose(a["score"], b["score"], atol=1e-6) and a["flag"].equals(b["flag"])


@pytest.fixture(scope="module")
def clean_seconds(cluster, archive: Path, local: Path) -> float:
    """A clean cluster run: its reports equal the local engine's; its duration."""
    out = archive.parent / "ray"
    started = time.perf_counter()
    done = cluster.run(*_scan(cluster, archive, out))
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_reports(out, local)
    return seconds


def test_cluster_reports_equal_the_local_engine(clean_seconds: float) -> None:
    assert clean_seconds > 0


@pytest.mark.parametrize("token", ["wrong-token", None], ids=["wrong", "missing"])
def test_a_wrong_or_missing_token_is_refused_at_once(
    cluster, archive: Path, tmp_path: Path, token: str | None
) -> None:
    started = time.perf_counter()
    done = cluster.run(*_scan(cluster, archive, tmp_path / "out"), env=cluster.env(token=token))
    assert done.returncode == 2, done.stderr[-2000:]
    assert time.perf_counter() - started < 10 + 10  # the connect timeout, plus start-up
    line = done.stderr.strip().splitlines()[-1]
    assert "RAY_AUTH_TOKEN" in line and "RAY_AUTH_TOKEN_PATH" in line
    assert ("none was given" if token is None else "is wrong") in line


def _run_and_kill(cluster, archive: Path, out: Path, after: float, kill) -> tuple[int, str]:
    """Start a cluster run, call `kill(driver)` `after` seconds in (while it still runs),
    and return the driver's exit status and stderr once it has ended."""
    driver = cluster.popen(*_scan(cluster, archive, out))
    time.sleep(max(3.0, after))
    assert driver.poll() is None, "the run ended before the fault could be made"
    kill(driver)
    _, err = driver.communicate(timeout=900)
    return driver.returncode, err


def test_a_killed_driver_is_finished_by_the_next_run(
    cluster, archive: Path, local: Path, clean_seconds: float
) -> None:
    out = archive.parent / "ray_driver_killed"
    _run_and_kill(cluster, archive, out, clean_seconds / 2, lambda d: d.send_signal(signal.SIGKILL))
    done = cluster.run(*_scan(cluster, archive, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_reports(out, local)


def test_losing_a_worker_node_mid_run_loses_nothing(
    cluster, archive: Path, local: Path, clean_seconds: float
) -> None:
    out = archive.parent / "ray_node_lost"
    lose = lambda _: cluster.kill_node(cluster.raylets[0])  # noqa: E731
    status, err = _run_and_kill(cluster, archive, out, clean_seconds / 3, lose)
    assert status == 0, err[-3000:]
    assert_same_reports(out, local)


def test_a_node_with_another_release_is_refused_before_any_file(
    archive: Path, tmp_path: Path
) -> None:
    """A worker node whose batchscan reports another version (a copy of the package that
    says 9.9.9, first on that node's PYTHONPATH): exit 2 naming both, nothing written."""
    import shutil

    import batchscan
    from batchscan import __version__

    other = tmp_path / "other"
    shutil.copytree(Path(batchscan.__file__).parent, other / "batchscan")
    init = other / "batchscan" / "__init__.py"
    # only the release changes: the rest of the package (versions(), ...) stays as it is
    source = init.read_text()
    init.write_text(source + '\n__version__ = "9.9.9"\n')
    with cluster_job.NetnsCluster(f"bsv{os.getpid()}", workers=0) as cluster:
        cluster.add_worker(PYTHONPATH=str(other))
        out = tmp_path / "out"
        done = cluster.run(*_scan(cluster, archive, out))
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert "batchscan 9.9.9" in line and f"batchscan {__version__}" in line
    assert not (out / "images.parquet").exists()
