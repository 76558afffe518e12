"""Shared fixtures: generated archives and the real files of pydicom and pydicom-data."""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Final

import pytest
from pydicom.data import get_testdata_file

from batchscan.site.training import default_npz_path

ROOT = Path(__file__).resolve().parents[1]
NPZ = default_npz_path(ROOT)
JOBS = ROOT / "jobs"


if str(JOBS) not in sys.path:  # jobs/common/: the helpers that jobs and tests share
    sys.path.insert(0, str(JOBS))


def load_job(name: str) -> ModuleType:
    """Import a script of jobs/ (they are thin scripts, not a package) by its path under
    jobs/ without ``.py`` (``"train"``, ``"experiments/blank_bound"``)."""
    module_name = "jobs_" + name.replace("/", "_")
    spec = importlib.util.spec_from_file_location(module_name, JOBS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


#: The user an unprivileged run becomes when the tests run as root (Debian's ``nobody``).
NOBODY = 65534


def scan_rows(archive: Path, out: Path, *extra: str) -> dict[str, tuple[str, str | None]]:
    """``batchscan scan ARCHIVE --out OUT`` for real, in this process (every stage: header,
    domain, decode, preprocess, the stability check, the blank gate, inference, the
    duplicate check); each file's (status, reason) from images.parquet by path."""
    from batchscan.cli import main

    argv = ["scan", str(archive), "--out", str(out), "--workers", "0", "--no-progress"]
    assert main([*argv, *extra]) == 0
    return _rows(out)


def _rows(out: Path) -> dict[str, tuple[str, str | None]]:
    """Each file's (status, reason) in REPORT_DIR `out`'s images.parquet, by path."""
    import pandas as pd

    frame = pd.read_parquet(out / "images.parquet", columns=["path", "status", "reason"])
    return {
        path: (status, reason if isinstance(reason, str) else None)
        for path, status, reason in frame.itertuples(index=False)
    }


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user may enter, for an archive that an unprivileged run reads
    (pytest's own temporary folders are their owner's only); removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="batchscan-test-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for inside in [folder, *folder.rglob("*")]:  # mode-000 entries, for a non-root owner
            if not inside.is_symlink():
                inside.chmod(0o755)
        shutil.rmtree(folder)


def _others_may_enter(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


def scan_rows_unprivileged(archive: Path, out: Path) -> dict[str, tuple[str, str | None]]:
    """:func:`scan_rows` run without privileges: the command in a process of its own which,
    as root (as in CI, where root would read every file whatever its mode), drops them with
    ``setpriv``: it becomes :data:`NOBODY`, given `out`, when this Python and checkout are
    open to other users; otherwise (a Python under /root) it stays uid 0 with every
    capability dropped, so that file modes bind it as they bind the files' owner. `archive`
    must be readable by that user (:func:`open_folder`)."""
    home = out.parent / f"{out.name}.home"  # Keras and TensorFlow may write there
    for folder in (out, home):
        folder.mkdir()
    command = [sys.executable, "-m", "batchscan.cli", "scan", str(archive), "--out", str(out),
               "--workers", "0", "--no-progress"]  # fmt: skip
    if os.geteuid() == 0:
        code = (ROOT, Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable))
        if all(_others_may_enter(p.resolve().parent) for p in code):
            for folder in (out, home):
                os.chown(folder, NOBODY, NOBODY)
            drop = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        else:
            drop = ["--bounding-set=-all", "--inh-caps=-all"]
        command = ["setpriv", *drop, "--", *command]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME=str(home))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return _rows(out)


def real_file(name: str) -> Path:
    """A file shipped by pydicom or pydicom-data (skips the test when it is not installed)."""
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data)")
    return Path(path)


@pytest.fixture(scope="session")
def pydicom_test_files() -> Path:
    """pydicom's own test_files folder (about 90 files, many syntaxes, broken ones)."""
    return real_file("CT_small.dcm").parent


@pytest.fixture(scope="session")
def pydicom_data_files() -> Path:
    """pydicom-data's folder (RG1, RG3, MR, CT, US, palette...)."""
    return real_file("RG1_UNCR.dcm").parent


@pytest.fixture(scope="session")
def npz_path() -> Path:
    """The PneumoniaMNIST npz, or a visible skip when ../shared/data is absent."""
    if not NPZ.is_file():
        pytest.skip(f"needs the training data at {NPZ} (set BATCHSCAN_DATA); CI has it")
    return NPZ


@pytest.fixture(scope="session")
def demo_srs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A demo archive (6 studies, 256 px) scanned once with ``--sr-out``: its ``archive``,
    its REPORT_DIR ``out`` and its SR ``outbox``, for the SR and send tests. Read only:
    a test that changes any of them works on a copy."""
    from batchscan.cli import main
    from batchscan.synth import write_demo_archive

    root = tmp_path_factory.mktemp("demo_srs")
    folders = {"archive": root / "archive", "out": root / "reports", "outbox": root / "sr"}
    write_demo_archive(folders["archive"], size=256)
    code = main(
        ["scan", str(folders["archive"]), "--out", str(folders["out"]), "--sr-out",
         str(folders["outbox"]), "--workers", "0", "--batch-size", "4", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    return folders


@pytest.fixture(scope="session")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model, as a site would deploy one: the shipped seed CNN with its output
    layer's weights moved (its features, and so its OOD statistics, stay valid), saved with
    its own card (``jobs/common/site_model.py`` makes it); its scores differ from the
    shipped model's on every film."""
    from common.site_model import site_model

    return site_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo archive (8 studies, 256 px), made once per test module."""
    from batchscan.synth import write_demo_archive

    root = tmp_path_factory.mktemp("demo")
    write_demo_archive(root, size=256, studies=8)
    return root


@pytest.fixture
def archive(demo: Path, tmp_path: Path) -> Path:
    """A private copy of the demo archive (tests change it)."""
    copy = tmp_path / "archive"
    shutil.copytree(demo, copy)
    return copy


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance (2 CPUs) for the module; its workers import this checkout
    (batchscan and tests.faults)."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo archive at 256 px, made once for the session and only read: the PACS tests
    load it into Orthanc and scan it as a folder to compare with."""
    from batchscan.synth import write_demo_archive

    folder = tmp_path_factory.mktemp("small_demo") / "archive"
    write_demo_archive(folder, size=256)
    return folder


def credentials_file(folder: Path, user: str, password: str) -> Path:
    """A ``--pacs-credentials`` file (``user:password``), readable by its owner only."""
    path = folder / "pacs.credentials"
    path.write_text(f"{user}:{password}\n", encoding="utf-8")
    path.chmod(0o600)
    return path


#: The nightly wrapper that cron and the systemd unit run.
NIGHTLY: Final = ROOT / "jobs" / "deploy" / "cron" / "batchscan-nightly.sh"


def nightly(config: Path, logs: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The nightly wrapper run as cron runs it (``CONFIG.toml LOG_DIR``), with this
    environment's ``batchscan`` command and `env` added to the environment."""
    return subprocess.run(
        ["bash", str(NIGHTLY), str(config), str(logs)],
        capture_output=True,
        text=True,
        env=dict(os.environ, BATCHSCAN=str(Path(sys.executable).with_name("batchscan")), **env),
        check=False,
    )
