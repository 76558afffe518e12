#!/usr/bin/env python3
"""A real multi-node Ray cluster on this machine, as docs/scale-out.md starts one, and
batchscan on it: throughput against the local engine, and what losing a node costs.

Usage (as root: it makes a network namespace):
    python jobs/bench/ray_cluster_check.py [--studies 600] [--workers 2]

The cluster is started the way Ray's docs start one, with token authentication on: a head
with ``ray start --head --num-cpus 0`` (it schedules no decoding), then worker nodes with
``ray start --address HEAD:PORT --num-cpus 1``, each its own raylet, all with
``RAY_AUTH_MODE=token`` and the same ``RAY_AUTH_TOKEN``. Everything runs inside a network
namespace made here with only its loopback interface up, so every node is 127.0.0.1 and no
packet can leave the machine (jobs/common/netns_cluster.py, which tests/test_ray_cluster.py
uses too).

Prints: the local engine on --workers decode processes against the cluster on --workers
worker nodes of one CPU (the same cores), and the same cluster run again from scratch with
one worker node's raylet killed (SIGKILL) a third of the way in.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/, for common/
from common.netns_cluster import BIN, NetnsCluster, namespaces_possible, write_archive


def scan_seconds(command: list[str], run) -> float:
    """Wall seconds of one ``batchscan scan`` (run by `run`), which must exit 0."""
    started = time.perf_counter()
    done = run(command)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (one CPU each)")
    args = parser.parse_args(argv)
    problem = namespaces_possible()
    if problem:
        raise SystemExit(problem)
    work = Path(tempfile.mkdtemp(prefix="bs-cluster-check-"))
    archive = write_archive(work / "archive", args.studies)
    scan = [str(BIN / "batchscan"), "scan", str(archive), "--no-progress"]
    local = scan_seconds(
        [*scan, "--out", str(work / "local"), "--workers", str(args.workers)],
        lambda c: subprocess.run(c, capture_output=True, text=True),
    )
    with NetnsCluster(f"bscheck{os.getpid()}", args.workers) as cluster:
        ray = [*scan, "--engine", "ray", "--ray-address", cluster.address]
        clean = scan_seconds([*ray, "--out", str(work / "ray")], lambda c: cluster.run(*c))
        driver = cluster.popen(*ray, "--out", str(work / "ray_lost"))
        time.sleep(clean / 3)
        cluster.kill_node(cluster.raylets[0])
        started = time.perf_counter()
        _, err = driver.communicate(timeout=1200)
        lost = clean / 3 + time.perf_counter() - started
        if driver.returncode != 0:
            raise SystemExit(f"the run with a node lost failed:\n{err[-3000:]}")
    print(f"{args.studies} files, {args.workers} decode cores either way")
    print("| engine | seconds | files/s | x local |")
    print("|---|---|---|---|")
    for name, seconds in (
        (f"local, --workers {args.workers}", local),
        (f"Ray: head (0 CPUs) + {args.workers} worker nodes of 1 CPU", clean),
        (f"Ray, one worker node killed at {clean / 3:.0f} s", lost),
    ):
        print(f"| {name} | {seconds:.1f} | {args.studies / seconds:.1f} | {local / seconds:.2f} |")
    print(f"the node loss cost {lost - clean:.1f} s")
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
