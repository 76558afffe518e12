"""The Ray engine gives the local engine's reports, records failing files, and is optional."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from batchscan.cli import main
from batchscan.engines.pipeline import ScanConfig
from batchscan.scan import run_scan
from batchscan.synth import write_demo_archive
from tests.faults import faulty_prepare

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    write_demo_archive(root, size=256, studies=4)
    shutil.copy(root / "2025/ACC1000/1/IM0000", root / "2025/SEGFAULT_IM")
    # a Latin-1 file name (not UTF-8) travels through Ray's Arrow tables as bytes
    shutil.copy(root / "2025/ACC1000/1/IM0000", os.fsencode(root / "2025") + b"/caf\xe9")
    return root


def _reports(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    images = pd.read_parquet(out / "images.parquet").set_index("path").sort_index()
    studies = pd.read_parquet(out / "studies.parquet").set_index("study_instance_uid")
    return images, studies.sort_index()


def test_ray_engine_matches_local_and_isolates_a_crashing_file(
    local_ray, archive: Path, tmp_path: Path, other_model: Path
) -> None:
    outs, stores = {}, {}
    for engine in ("local", "ray"):
        outs[engine] = tmp_path / engine
        result = run_scan(
            ScanConfig(
                archive=archive,
                out=outs[engine],
                workers=2,
                files_per_task=4,
                engine=engine,
                prepare=faulty_prepare,
                shadow_model=other_model,
            )
        )
        stores[engine] = result.manifest["input_store"]["entries"]
    (local_images, local_studies), (ray_images, ray_studies) = map(_reports, outs.values())
    key = ["status", "reason"]
    pd.testing.assert_frame_equal(ray_images[key], local_images[key])
    pd.testing.assert_series_equal(ray_images["score"], local_images["score"], atol=1e-6)
    pd.testing.assert_series_equal(
        ray_images["shadow_score"], local_images["shadow_score"], atol=1e-6
    )
    assert stores["ray"] == stores["local"] > 0, "the inputs come back from the cluster"
    pd.testing.assert_frame_equal(ray_studies, local_studies, atol=1e-6)
    crashed = ray_images.loc["2025/SEGFAULT_IM"]
    assert (crashed["status"], crashed["reason"]) == ("failed", "worker_crash")
    assert (ray_images["status"] == "scored").sum() == 4
    latin = ray_images.loc["2025/caf\\xe9"]  # the same SOP instance as IM0000: scored once
    assert (latin["status"], latin["reason"]) == ("skipped", "duplicate_of:2025/ACC1000/1/IM0000")


def test_ray_engine_without_the_extra_is_exit_2(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    assert main(["scan", str(archive), "--out", str(tmp_path / "r"), "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'batchscan[ray]'" in err and err.count("\n") == 1


def test_unreachable_cluster_is_exit_2_not_a_hang(archive: Path, tmp_path: Path, capsys) -> None:
    """Ray retries an unreachable head without end; the job checks it first."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["scan", str(archive), "--out", str(tmp_path / "r"), "--engine", "ray"]
    assert main([*argv, "--ray-address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert "Ray cluster at --ray-address" in err and "no answer from" in err
    assert err.count("\n") == 1
    assert main([*argv, "--ray-address", "nonsense"]) == 2


def test_a_window_failing_half_way_is_submitted_again_for_what_did_not_come_back(
    local_ray, archive: Path, tmp_path: Path, monkeypatch
) -> None:
    """As when a node is lost under a run and Ray's own retries are spent: the driver submits
    again only the records that have not come back, so every file has exactly one row."""
    import ray

    from batchscan.engines import ray_engine

    real, calls = ray_engine._window, []

    def flaky(config, records, model_path):
        calls.append(len(records))
        batches = real(config, records, model_path)
        if len(calls) == 1:
            yield next(batches)  # some records come back, then the node "goes"
            raise ray.exceptions.RayError("a node was lost")
        yield from batches

    monkeypatch.setattr(ray_engine, "_window", flaky)
    monkeypatch.setattr(ray_engine, "NODE_LOSS_PAUSE", 0.01)
    monkeypatch.setattr(ray_engine, "NODE_DEATH_WAIT", 0.1)  # no node is lost here
    outs = {}
    for engine in ("local", "ray"):
        outs[engine] = tmp_path / engine
        run_scan(
            ScanConfig(
                archive=archive,
                out=outs[engine],
                workers=2,
                files_per_task=2,
                batch_size=2,  # small blocks: part of the window comes back before the "loss"
                engine=engine,
            )
        )
    assert len(calls) == 2 and 0 < calls[1] < calls[0]
    (local_images, local_studies), (ray_images, ray_studies) = map(_reports, outs.values())
    pd.testing.assert_frame_equal(ray_studies, local_studies, atol=1e-6)
    assert ray_images.index.is_unique and ray_images.index.equals(local_images.index)
    pd.testing.assert_frame_equal(
        ray_images[["status", "reason"]], local_images[["status", "reason"]]
    )
    pd.testing.assert_series_equal(ray_images["score"], local_images["score"], atol=1e-6)


def test_preflight_refuses_a_node_that_cannot_read_the_archive(local_ray, tmp_path: Path) -> None:
    """Every node with CPUs must see the archive at the same path (checked before any file is
    read); here the one node is asked about a path it does not have."""
    from batchscan.engines.ray_engine import ClusterError, preflight

    assert preflight(tmp_path) == 1  # one node with CPUs, same releases, sees the folder
    with pytest.raises(ClusterError, match=r"cannot read the archive at .*same path"):
        preflight(tmp_path / "not-mounted-here")
