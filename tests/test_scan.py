"""The scan job end to end on a generated archive: accounting, scores, reports, exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from batchscan.cli import main
from batchscan.engines.pipeline import model_input
from batchscan.ingest.header import StageOptions
from batchscan.results.runlock import report_dir_lock
from batchscan.scoring.model import load_model
from batchscan.synth import write_demo_archive
from tests.conftest import ROOT, nightly

EXPECTED = {  # demo archive, default mode: per study one frontal scored, the lateral skipped
    "scored": 6,
    "skipped": 10,  # 6 laterals, the CT, README.txt, labels.csv and reports.csv (not DICOM)
    "failed": 1,
}


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    return {
        str(p.relative_to(root)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    write_demo_archive(root, size=384)
    return root


@pytest.fixture(scope="module")
def scanned(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    before = _snapshot(demo)
    out = tmp_path_factory.mktemp("reports")
    assert (
        main(
            [
                "scan",
                str(demo),
                "--out",
                str(out),
                "--workers",
                "2",
                "--batch-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    assert _snapshot(demo) == before, "the archive must never be written to"
    return demo, out, before


def test_every_file_accounted(scanned) -> None:
    demo, out, _ = scanned
    images = pd.read_parquet(out / "images.parquet")
    files = sorted(str(p.relative_to(demo)) for p in demo.rglob("*") if p.is_file())
    assert sorted(images["path"]) == files
    assert images["status"].value_counts().to_dict() == EXPECTED
    reasons = images.set_index("path")["reason"]
    assert reasons["2026/CT/slice001.dcm"] == "modality:CT"
    assert reasons["2026/broken/IM0001"] == "truncated_pixel_data"
    assert reasons["2026/README.txt"] == "not_dicom"
    assert reasons["labels.csv"] == reasons["reports.csv"] == "not_dicom"
    assert set(images.loc[images["view"] == "LL", "reason"]) == {"view:LL"}
    scored = images[images["status"] == "scored"]
    assert scored["reason"].isna().all()
    assert scored["score"].between(0.0, 1.0).all()
    assert images.loc[images["status"] != "scored", "score"].isna().all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts_by_status"] == EXPECTED
    assert manifest["files_found"] == len(files)


def test_written_score_equals_model_on_preprocessed_image(scanned) -> None:
    demo, out, _ = scanned
    images = pd.read_parquet(out / "images.parquet")
    scored = images[images["status"] == "scored"]
    model = load_model()
    inputs = np.stack([model_input(demo / p, StageOptions()) for p in scored["path"]])
    direct = model.keras_model.predict(inputs, verbose=0).reshape(-1)
    assert np.allclose(scored["score"].to_numpy(), direct, atol=1e-5)
    assert (images["model_version"] == model.version).all()


def test_studies_aggregate_their_images(scanned) -> None:
    _, out, _ = scanned
    images = pd.read_parquet(out / "images.parquet")
    studies = pd.read_parquet(out / "studies.parquet")
    csv = pd.read_csv(out / "studies.csv", dtype={"study_date": str})
    assert len(studies) == 6 and list(csv["study_instance_uid"]) == list(
        studies["study_instance_uid"]
    )
    threshold = load_model().threshold
    for row in studies.itertuples():
        mine = images[
            (images["study_instance_uid"] == row.study_instance_uid)
            & (images["status"] == "scored")
        ]
        assert row.score == pytest.approx(mine["score"].max())
        assert row.flag == (row.score >= threshold)
        assert row.n_images_scored == len(mine) == 1
        assert row.n_images_total == 2
        assert row.accession_number.startswith("ACC")
    assert np.allclose(csv["score"], studies["score"])


def test_report_types(scanned) -> None:
    _, out, _ = scanned
    images = pq.read_schema(out / "images.parquet")
    assert str(images.field("score").type) == "double"
    assert str(images.field("path").type) == "string"
    studies = pq.read_schema(out / "studies.parquet")
    expected = {
        "study_instance_uid": "string",
        "score": "double",
        "flag": "bool",
        "n_images_scored": "int64",
        "accession_number": "string",
        "study_date": "date32[day]",
        "manufacturer": "string",
        "patient_sex": "string",
        "model_version": "string",
    }
    for name, kind in expected.items():
        assert str(studies.field(name).type) == kind, name
    assert str(images.field("study_date").type) == "date32[day]"
    frame = pd.read_parquet(out / "studies.parquet")
    assert frame["flag"].dtype == bool and frame["score"].dtype == np.float64
    import datetime

    dates = frame.set_index("accession_number")["study_date"]
    assert dates["ACC1000"] == datetime.date(2026, 1, 10)  # demo StudyDate 20260110
    csv = (out / "studies.csv").read_text()
    assert '"ACC1000",2026-01-10,' in csv  # ISO in the CSV
    assert set(frame["patient_sex"]) <= {"M", "F", "O", None}


def test_no_patient_identifiers_in_any_output(demo: Path, tmp_path: Path) -> None:
    """A nightly run as cron makes it (the wrapper around the installed command, logging at
    its default INFO): no name, ID or birth date of the archive's headers reaches what the
    wrapper prints on stdout or stderr, its log (which keeps both streams of the command),
    or any file of REPORT_DIR (Parquet read as tables, since its pages are compressed)."""
    out, logs, config = tmp_path / "out", tmp_path / "logs", tmp_path / "batchscan.toml"
    config.write_text(f'archive = "{demo}"\nout = "{out}"\nworkers = 2\n')
    done = nightly(config, logs, PYTHONPATH=str(ROOT))
    assert done.returncode == 0, done.stdout
    (log,) = logs.glob("batchscan-*.log")
    texts = {"stdout": done.stdout, "stderr": done.stderr, log.name: log.read_text()}
    assert "batchscan run" in texts[log.name], "the log holds what the command printed"
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        texts[path.name] = (
            pd.read_parquet(path).astype(str).to_csv()
            if path.suffix == ".parquet"
            else path.read_bytes().decode("latin-1")
        )
    assert {"images.parquet", "state.sqlite", "report.html", "manifest.json"} <= set(texts)
    for secret in ("DEMO^PATIENT", "PATIENT0", "19700101", "DEMO0000", "PAT0001"):
        for name, text in texts.items():
            assert secret not in text, f"{secret} in {name}"


def test_no_temporary_files_left(scanned) -> None:
    _, out, _ = scanned
    assert sorted(p.name for p in out.iterdir()) == [
        ".batchscan.lock",
        "drift.csv",  # every scan watches the films (batchscan.site.drift)
        "drift.parquet",
        "images.parquet",
        "inputs.sqlite",
        "manifest.json",
        "report.html",
        "report_figures.json",
        "runs.parquet",
        "state.sqlite",
        "studies.csv",
        "studies.parquet",
    ]


def test_in_process_decoding_gives_same_reports(scanned, tmp_path: Path) -> None:
    demo, out, _ = scanned
    assert main(["scan", str(demo), "--out", str(tmp_path), "--workers", "0", "--no-progress"]) == 0
    key = ["path", "status", "reason", "score"]
    a = pd.read_parquet(out / "images.parquet")[key].sort_values("path", ignore_index=True)
    b = pd.read_parquet(tmp_path / "images.parquet")[key].sort_values("path", ignore_index=True)
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6)


def test_usage_errors_exit_2(tmp_path: Path, demo: Path, capsys) -> None:
    assert main(["scan", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "archive folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["scan", str(demo), "--out", str(tmp_path / "r"), "--batch-size", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch-size" in err
    assert main(["scan", str(demo)]) == 2  # --out missing
    assert "--out REPORT_DIR is required" in capsys.readouterr().err
    assert main(["scan", str(demo), "--out", str(demo / "reports")]) == 2
    assert not (demo / "reports").exists()
    assert (
        main(
            [
                "scan",
                str(demo),
                "--out",
                str(tmp_path / "r2"),
                "--model",
                str(tmp_path / "none.keras"),
            ]
        )
        == 2
    )


def test_locked_report_dir_exits_3(tmp_path: Path, demo: Path, capsys) -> None:
    out = tmp_path / "r"
    out.mkdir()
    with report_dir_lock(out):
        assert main(["scan", str(demo), "--out", str(out), "--no-progress"]) == 3
    assert f"pid {os.getpid()}" in capsys.readouterr().err


def test_workers_never_import_tensorflow(demo: Path) -> None:
    code = (
        "import sys\n"
        "from batchscan.ingest.discover import iter_files\n"
        "from batchscan.ingest.header import StageOptions\n"
        "from batchscan.engines.pipeline import prepare_batch\n"
        f"batch = prepare_batch(list(iter_files({str(demo)!r})), StageOptions())\n"
        "assert len(batch.inputs) == 6, len(batch.inputs)\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False False"


def test_console_script_runs(demo: Path, tmp_path: Path) -> None:
    """The installed command, as cron calls it: exit 0, a one-paragraph summary, quiet."""
    result = subprocess.run(
        [sys.executable, "-m", "batchscan.cli", "scan", str(demo), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "scored 6" in result.stdout
    assert result.stderr == ""


def test_reports_and_state_are_readable_by_owner_and_group_only(tmp_path: Path) -> None:
    """They hold accession numbers, ages and study dates: 0640 at most, a stricter umask
    wins, and a state left 0644 by an older release loses its "other" bits."""
    import stat

    from batchscan.cli import main

    archive, out = tmp_path / "archive", tmp_path / "out"
    write_demo_archive(archive, size=128, studies=2)
    out.mkdir()
    (out / "state.sqlite").touch(mode=0o644)
    (out / "state.sqlite").chmod(0o644)
    previous = os.umask(0o022)
    try:
        assert main(["scan", str(archive), "--out", str(out), "--workers", "0"]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert {"images.parquet", "studies.csv", "report.html", "state.sqlite"} <= set(modes)
    assert all(mode & 0o027 == 0 for mode in modes.values()), {k: oct(v) for k, v in modes.items()}
    assert modes["images.parquet"] == 0o640
