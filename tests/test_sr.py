"""One DICOM SR per scored study (``scan --sr-out``): content, validity by dciodvfy and
DCMTK, incremental and idempotent UIDs, and nothing of the patient's in what is printed."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from batchscan.cli import main
from batchscan.pacs.outbox import Outbox
from batchscan.pacs.sr import (
    Algorithm,
    EvidenceError,
    ScoredImage,
    StudyResult,
    build_sr,
    content_digest,
    read_evidence,
    sr_instance_uid,
)
from batchscan.pacs.write import encode_sr, write_srs
from batchscan.results.state import STATE_FILE, StateStore
from tests.conftest import real_file

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
TOOLS = "bash tests/debian-tools.sh installs it (as root)"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed; {TOOLS}")
    return path


def scan(archive: Path, out: Path, sr_out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(
        [
            "scan",
            str(archive),
            "--out",
            str(out),
            "--sr-out",
            str(sr_out),
            "--workers",
            "0",
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    return printed.out + printed.err


def sr_files(outbox: Path) -> list[Path]:
    return sorted(outbox.glob("*/*.dcm"))


def content_items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def nums(ds: Dataset, meaning: str) -> list[float]:
    return [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in content_items(ds)
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def validator_errors(path: Path) -> list[str]:
    """dciodvfy's Error lines for one file (it prints to stderr and exits 0 either way)."""
    done = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True)
    return [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]


def test_every_scored_study_has_exactly_one_sr_with_its_score(
    demo_srs: dict[str, Any],
) -> None:
    studies = pd.read_parquet(demo_srs["out"] / "studies.parquet").set_index("study_instance_uid")
    images = pd.read_parquet(demo_srs["out"] / "images.parquet")
    files = sr_files(demo_srs["outbox"])
    assert len(files) == len(studies) == 6
    for path in files:
        sr = pydicom.dcmread(path)
        study = studies.loc[sr.StudyInstanceUID]
        assert path.parent.name == sr.StudyInstanceUID
        assert sr.SOPClassUID == COMPREHENSIVE_SR
        assert path.stat().st_mode & 0o777 == 0o640
        # the study's score, the threshold and one score per scored image
        scored = images[
            (images["study_instance_uid"] == sr.StudyInstanceUID) & (images["status"] == "scored")
        ]
        found = nums(sr, "Pneumonia score")
        assert found[0] == pytest.approx(study["score"], abs=1e-6)
        assert sorted(found[1:]) == pytest.approx(sorted(scored["score"]), abs=1e-6)
        assert nums(sr, "Operating threshold") == [pytest.approx(0.736, abs=1e-3)]
        flags = [
            i.ConceptCodeSequence[0].CodeMeaning
            for i in content_items(sr)
            if i.ConceptNameCodeSequence[0].CodeMeaning == "Flagged for review"
        ]
        assert flags == ["Yes" if study["flag"] else "No"]
        texts = [i.TextValue for i in content_items(sr) if i.ValueType == "TEXT"]
        assert any(t.startswith("Not a diagnosis.") for t in texts)
        assert "Algorithm Version" in {
            i.ConceptNameCodeSequence[0].CodeMeaning for i in content_items(sr)
        }
        # the scored images are its evidence, and the patient is the source's
        evidence = sr.CurrentRequestedProcedureEvidenceSequence
        referenced = {
            r.ReferencedSOPInstanceUID
            for e in evidence
            for s in e.ReferencedSeriesSequence
            for r in s.ReferencedSOPSequence
        }
        assert referenced == set(scored["sop_instance_uid"])
        source = pydicom.dcmread(
            demo_srs["archive"] / scored["path"].iloc[0], stop_before_pixels=True
        )
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber"):
            assert sr.get(keyword) == source.get(keyword)
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID
        assert sr.SeriesNumber == 9901


def test_every_sr_is_valid_by_dciodvfy_and_read_by_dsrdump(
    demo_srs: dict[str, Any],
) -> None:
    dsrdump = need("dsrdump")
    files = sr_files(demo_srs["outbox"])
    assert files
    for path in files:
        assert validator_errors(path) == [], path
        dump = subprocess.run([dsrdump, str(path)], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        assert "Imaging Measurement Report" in dump.stdout
        assert "Pneumonia score" in dump.stdout


def _copy_scanned(demo_srs: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    copy = {k: tmp_path / k for k in demo_srs}
    for key, folder in demo_srs.items():
        shutil.copytree(folder, copy[key])
    return copy


def _published(outbox: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sr_files(outbox)}


def test_a_rerun_with_nothing_new_writes_nothing(
    demo_srs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_scanned(demo_srs, tmp_path)
    before = _published(run["outbox"])
    printed = scan(run["archive"], run["out"], run["outbox"], capsys)
    assert "SRs: 0 written, 6 unchanged" in printed
    assert _published(run["outbox"]) == before


def test_a_new_image_gives_one_new_sr_for_its_study_alone(
    demo_srs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_scanned(demo_srs, tmp_path)
    before = _published(run["outbox"])
    images = pd.read_parquet(run["out"] / "images.parquet")
    frontal = images[images["status"] == "scored"].iloc[0]
    ds = pydicom.dcmread(run["archive"] / frontal["path"])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 3
    ds.save_as(run["archive"] / "added_frontal.dcm")

    printed = scan(run["archive"], run["out"], run["outbox"], capsys)
    assert "SRs: 1 written, 5 unchanged" in printed
    after = _published(run["outbox"])
    new = sorted(set(after) - set(before))
    assert len(new) == 1 and set(before) <= set(after), "the earlier SRs are kept"
    assert new[0].parent.name == frontal["study_instance_uid"]
    sr = pydicom.dcmread(new[0])
    assert sr.InstanceNumber == 2
    referenced = {
        r.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for r in s.ReferencedSOPSequence
    }
    assert referenced == {frontal["sop_instance_uid"], ds.SOPInstanceUID}
    assert len(nums(sr, "Pneumonia score")) == 3  # the study and its two images


def test_a_study_that_loses_every_scored_image_is_listed_once(
    demo_srs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_scanned(demo_srs, tmp_path)
    images = pd.read_parquet(run["out"] / "images.parquet")
    frontal = images[images["status"] == "scored"].iloc[0]
    (run["archive"] / frontal["path"]).unlink()
    before = _published(run["outbox"])

    printed = scan(run["archive"], run["out"], run["outbox"], capsys)
    assert "SRs: 0 written, 5 unchanged" in printed
    assert "1 studies with an earlier SR have no scored image now" in printed
    assert frontal["study_instance_uid"] in printed
    assert _published(run["outbox"]) == before, "no new SR, the earlier one kept"
    printed = scan(run["archive"], run["out"], run["outbox"], capsys)
    assert frontal["study_instance_uid"] not in printed


def test_nothing_of_the_patient_is_printed(
    demo_srs: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = _copy_scanned(demo_srs, tmp_path)
    shutil.rmtree(run["outbox"])
    printed = scan(run["archive"], run["out"], run["outbox"], capsys) + caplog.text
    assert "SRs: 6 written" in printed
    for path in sr_files(run["outbox"]):
        sr = pydicom.dcmread(path)
        for value in (str(sr.PatientName), sr.PatientID, sr.AccessionNumber):
            assert value and value not in printed
    ledger = (run["outbox"] / "outbox.sqlite").read_bytes()
    assert b"DEMO^PATIENT" not in ledger and b"DEMO00" not in ledger


def test_a_changed_source_gets_no_sr_until_it_is_scored_again(
    demo_srs: dict[str, Any], tmp_path: Path
) -> None:
    run = _copy_scanned(demo_srs, tmp_path)
    shutil.rmtree(run["outbox"])
    images = pd.read_parquet(run["out"] / "images.parquet")
    frontal = images[images["status"] == "scored"].iloc[0]
    path = run["archive"] / frontal["path"]
    path.write_bytes(path.read_bytes() + b"\0\0")  # changed after it was scored
    state = StateStore(run["out"] / STATE_FILE)
    try:
        outcome = write_srs(state, run["archive"], run["outbox"], Algorithm("m", 0.5), "t")
    finally:
        state.close()
    assert (outcome.written, dict(outcome.not_written)) == (5, {"source_changed": 1})
    assert "source_changed 1" in outcome.summary()


def test_sr_out_inside_the_archive_is_refused(
    demo_srs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "scan",
            str(demo_srs["archive"]),
            "--out",
            str(tmp_path / "r"),
            "--sr-out",
            str(demo_srs["archive"] / "sr"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "inside the archive" in capsys.readouterr().err
    assert not (demo_srs["archive"] / "sr").exists()


def test_sr_out_from_the_config_file(
    demo_srs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "batchscan.toml"
    config.write_text(
        f'archive = "{demo_srs["archive"]}"\nout = "reports"\nsr_out = "outbox"\nworkers = 0\n'
    )
    assert main(["scan", "--config", str(config), "--no-progress"]) == 0
    assert "SRs: 6 written" in capsys.readouterr().out
    assert len(sr_files(tmp_path / "outbox")) == 6


# -- the SR's UIDs and content from headers of the real world -----------------------------


def _study(images: list[ScoredImage], uid: str = "1.2.3.4") -> StudyResult:
    return StudyResult(uid, 0.8, True, "frontal", False, tuple(images))


def _image(score: float = 0.8, sop: str = "1.2.3.4.5") -> ScoredImage:
    return ScoredImage("a.dcm", 1, 1, sop, "1.2.840.10008.5.1.4.1.1.1", "1.2.3", "PA", score,
                       3.0, False, True)  # fmt: skip


def test_uids_depend_on_the_study_the_model_and_the_content_only() -> None:
    study = _study([_image()])
    model = Algorithm("model-a", 0.5)
    uid = sr_instance_uid(content_digest(study, model))
    assert uid.startswith("2.25.") and len(uid) <= 64
    assert uid == sr_instance_uid(content_digest(_study([_image()]), Algorithm("model-a", 0.5)))
    others = {
        sr_instance_uid(content_digest(_study([_image(0.7)]), model)),
        sr_instance_uid(content_digest(study, Algorithm("model-b", 0.5))),
        sr_instance_uid(content_digest(study, Algorithm("model-a", 0.6))),
        sr_instance_uid(content_digest(_study([_image()], uid="1.2.3.5"), model)),
        sr_instance_uid(content_digest(_study([_image(), _image(sop="1.2.3.4.6")]), model)),
    }
    assert uid not in others and len(others) == 5


@pytest.mark.parametrize(
    "name",
    ["RG1_UNCR.dcm", "RG3_UNCI.dcm", "CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"],
)
def test_an_sr_from_real_headers_is_valid(name: str, tmp_path: Path) -> None:
    """Headers of real devices (pydicom's and pydicom-data's files): empty or missing
    patient attributes, no Patient Orientation or Imager Pixel Spacing, other modalities."""
    source = real_file(name)
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(source, archive / "image.dcm")
    header = pydicom.dcmread(source, stop_before_pixels=True)
    stat = (archive / "image.dcm").stat()
    image = ScoredImage(
        "image.dcm", stat.st_size, stat.st_mtime_ns, header.SOPInstanceUID, header.SOPClassUID,
        header.SeriesInstanceUID, None, 0.25, None, None, None,
    )  # fmt: skip
    study = _study([image], uid=header.StudyInstanceUID)
    model = Algorithm("model-a", 0.5)
    evidence = read_evidence(archive, study)
    sr = build_sr(study, evidence, model, sr_instance_uid(content_digest(study, model)), 1)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).StudyInstanceUID == header.StudyInstanceUID
    if shutil.which("dciodvfy"):
        assert validator_errors(path) == []
    assert nums(pydicom.dcmread(path), "Pneumonia score") == [0.8, 0.25]


def test_evidence_that_is_not_the_scored_image_is_refused(tmp_path: Path) -> None:
    source = real_file("RG1_UNCR.dcm")
    shutil.copy(source, tmp_path / "image.dcm")
    stat = (tmp_path / "image.dcm").stat()
    wrong = ScoredImage("image.dcm", stat.st_size, stat.st_mtime_ns, "9.9.9", None, None, None,
                        0.5, None, None, None)  # fmt: skip
    with pytest.raises(EvidenceError) as caught:
        read_evidence(tmp_path, _study([wrong]))
    assert caught.value.reason == "source_mismatch"
    gone = ScoredImage("gone.dcm", 1, 1, "9.9.9", None, None, None, 0.5, None, None, None)
    with pytest.raises(EvidenceError) as caught:
        read_evidence(tmp_path, _study([gone]))
    assert caught.value.reason == "source_changed"


def test_the_ledger_survives_a_run_killed_between_file_and_record(
    demo_srs: dict[str, Any], tmp_path: Path
) -> None:
    """An SR file whose ledger row is missing (killed in between) is recorded, not made
    again: same UID, same file."""
    run = _copy_scanned(demo_srs, tmp_path)
    with Outbox(run["outbox"]) as outbox:
        assert outbox.count() == 6
    (run["outbox"] / "outbox.sqlite").unlink()
    before = _published(run["outbox"])
    state = StateStore(run["out"] / STATE_FILE)
    try:
        outcome = write_srs(state, run["archive"], run["outbox"], _model(run), "t")
    finally:
        state.close()
    assert outcome.written == 6
    assert _published(run["outbox"]) == before


def _model(run: dict[str, Any]) -> Algorithm:
    manifest = json.loads((run["out"] / "manifest.json").read_text())
    return Algorithm(manifest["model"]["version"], manifest["model"]["threshold"])


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")  # the test writes them on purpose
def test_odd_patient_and_study_values_still_give_a_valid_sr_and_are_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Real archives hold dates that are no dates and names highdicom finds odd (it logs
    them, quoting the name): the SR is made with those left empty, and nothing is printed."""
    archive = tmp_path / "archive"
    archive.mkdir()
    ds = pydicom.dcmread(real_file("RG1_UNCR.dcm"))
    ds.PatientName = "Odd=Name=With=Too=Many=Groups"
    ds.StudyDate, ds.StudyTime, ds.PatientBirthDate = "20260231", "256199", "19701399"
    ds.PatientSex = "male"
    ds.save_as(archive / "image.dcm")
    stat = (archive / "image.dcm").stat()
    image = ScoredImage("image.dcm", stat.st_size, stat.st_mtime_ns, ds.SOPInstanceUID,
                        ds.SOPClassUID, ds.SeriesInstanceUID, None, 0.5, None, None,
                        None)  # fmt: skip
    study = _study([image], uid=ds.StudyInstanceUID)
    caplog.clear()

    data = encode_sr(study, archive, Algorithm("m", 0.5), "2.25.1", 1)
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    sr = pydicom.dcmread(path)
    assert (sr.StudyDate, sr.StudyTime, sr.PatientBirthDate, sr.PatientSex) == ("", "", "", "")
    assert sr.PatientID == ds.PatientID
    if shutil.which("dciodvfy"):
        assert [e for e in validator_errors(path) if "Person Name" not in e] == []
    printed = capsys.readouterr()
    seen = printed.out + printed.err + caplog.text
    assert "Odd" not in seen and "male" not in seen and "19701399" not in seen, seen


def test_srs_made_in_worker_processes_are_the_same_srs(
    demo_srs: dict[str, Any], tmp_path: Path
) -> None:
    run = _copy_scanned(demo_srs, tmp_path)
    shutil.rmtree(run["outbox"])
    state = StateStore(run["out"] / STATE_FILE)
    try:
        outcome = write_srs(state, run["archive"], run["outbox"], _model(run), "t", workers=2)
    finally:
        state.close()
    assert (outcome.written, outcome.unchanged) == (6, 0)
    assert [p.relative_to(run["outbox"]) for p in sr_files(run["outbox"])] == [
        p.relative_to(demo_srs["outbox"]) for p in sr_files(demo_srs["outbox"])
    ]
