"""A real multi-node Ray cluster on this machine, in a network namespace of its own: what
jobs/bench/ray_cluster_check.py measures on and tests/test_ray_cluster.py tests on.

The cluster is started the way Ray's docs start one, with token authentication on: a head
with ``ray start --head --num-cpus 0`` (it schedules no decoding), then worker nodes with
``ray start --address HEAD:PORT --num-cpus 1``, each its own raylet, all with
``RAY_AUTH_MODE=token`` and the same ``RAY_AUTH_TOKEN``. Everything runs inside a network
namespace made here with only its loopback interface up, so every node is 127.0.0.1 and no
packet can leave the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Where `ray` and `batchscan` are: the environment this Python runs in.
BIN = Path(sys.executable).parent


def namespaces_possible() -> str | None:
    """Why network namespaces cannot be made here (not root, no iproute2), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "no 'ip' command (Debian's iproute2)"
    return None


class NetnsCluster:
    """A Ray cluster of one head and `workers` worker nodes in a namespace of its own.

    Parameters
    ----------
    name:
        Namespace name (unique on the machine).
    workers:
        Worker nodes, one CPU each.
    token:
        The cluster's authentication token (made here by default).
    """

    def __init__(self, name: str, workers: int = 2, token: str | None = None) -> None:
        self.name = name
        self.token = token or secrets.token_hex(24)
        self.port = 6380
        self.temp = Path(tempfile.mkdtemp(prefix="bsray-", dir="/tmp"))  # short: Ray's sockets
        self.home = self.temp / "home"  # no ~/.ray/auth_token of the machine's user
        self.home.mkdir()
        self.workers = workers
        self.raylets: list[int] = []

    @property
    def address(self) -> str:
        """The head's GCS address, as ``--ray-address`` takes it."""
        return f"127.0.0.1:{self.port}"

    def env(self, token: str | None = "cluster", **extra: str) -> dict[str, str]:
        """Environment of a process of the cluster, or of a driver with `token` (the
        cluster's by default; None: no token at all)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(HOME=str(self.home), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
        if token is not None:
            env["RAY_AUTH_TOKEN"] = self.token if token == "cluster" else token
        env.update(extra)
        return env

    def run(
        self, *command: str, env: dict[str, str] | None = None, timeout: float = 600, **kw
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (from the cluster's own folder: Ray puts a
        driver's working directory on its workers' path, and a source tree there would stand
        in for the release installed on the nodes)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *command],
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.temp,
            **kw,
        )

    def popen(self, *command: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start a command inside the namespace (for a driver to kill)."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.name, *command],
            env=env or self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.temp,
        )

    def pids(self) -> set[int]:
        """Every process in the namespace: the ones this cluster (and its drivers) started."""
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return {int(p) for p in out.stdout.split()}

    def _ray_start(self, *arguments: str, env: dict[str, str] | None = None) -> None:
        done = self.run(
            str(BIN / "ray"),
            "start",
            "--node-ip-address",
            "127.0.0.1",
            "--disable-usage-stats",
            *arguments,
            env=env,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(arguments)} failed:\n{done.stderr[-2000:]}")

    def start(self) -> NetnsCluster:
        """Make the namespace (loopback only) and start the head and the worker nodes."""
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(
            ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"], check=True
        )
        self._ray_start(
            "--head",
            "--port",
            str(self.port),
            "--num-cpus",
            "0",
            "--include-dashboard",
            "false",
            "--temp-dir",
            str(self.temp),
        )
        for _ in range(self.workers):
            self.add_worker()
        return self

    def add_worker(self, **extra_env: str) -> int:
        """Start one more worker node (one CPU); returns its raylet's pid."""
        before = self.pids()
        self._ray_start("--address", self.address, "--num-cpus", "1", env=self.env(**extra_env))
        for pid in sorted(self.pids() - before):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if command.endswith(b"/raylet"):
                self.raylets.append(pid)
                return pid
        raise RuntimeError("the new worker node's raylet was not found")

    def kill_node(self, raylet: int) -> None:
        """SIGKILL one node's raylet (its workers go with it), as a lost machine does."""
        os.kill(raylet, signal.SIGKILL)

    def stop(self) -> None:
        """End every process in the namespace (only those), then remove it."""
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self) -> NetnsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_archive(root: Path, studies: int) -> Path:
    """`studies` one-image studies (phantoms at 512 px, half with an opacity)."""
    import numpy as np

    from batchscan.synth import chest_phantom, write_labelled_studies

    pictures = [
        np.rint(255 * chest_phantom(512, seed=i, opacity=0.9 * (i % 2))).astype(np.uint8)
        for i in range(studies)
    ]
    write_labelled_studies(root, pictures, [i % 2 for i in range(studies)], prefix="C")
    return root
