"""One DICOM SR per scored study (``scan --sr-out``): content, IHE AI Results' algorithm
identification, validity by Pixelmed's DicomSRValidator, dciodvfy and DCMTK, the template's
SR equal to highdicom's, incremental and idempotent UIDs, and nothing of the patient's in
what is printed."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from batchscan.cli import main
from batchscan.pacs import write
from batchscan.pacs.outbox import Outbox
from batchscan.pacs.sr import (
    Algorithm,
    EvidenceError,
    ScoredImage,
    StudyResult,
    build_sr,
    content_digest,
    device_uid,
    read_evidence,
    sr_instance_uid,
    study_results,
)
from batchscan.pacs.template import SrTemplate
from batchscan.pacs.write import encode_sr, write_srs
from batchscan.results.state import STATE_FILE, StateStore
from tests.conftest import real_file
from tests.sr_validators import dciodvfy_errors, need, pixelmed_findings, tree_shape

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
NOW = datetime(2026, 5, 14, 10, 15, tzinfo=UTC)
#: What highdicom sets to the time it runs: the only elements in which an SR made from the
#: template may differ from highdicom's.
CREATION_TIMES = frozenset({"InstanceCreationDate", "InstanceCreationTime", "ContributionDateTime"})


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
        assert dciodvfy_errors(path) == [], path
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


#: Headers of real devices (pydicom's and pydicom-data's files): missing or empty patient
#: attributes, Patient Orientation without Imager Pixel Spacing, a named acquisition
#: device, CT and MR images with an image library entry, a secondary capture of NM.
REAL_HEADERS = ("RG1_UNCR.dcm", "RG3_UNCI.dcm", "CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")


def _scored(archive: Path, name: str, header: Dataset, score: float) -> ScoredImage:
    path = archive / name
    header.save_as(path)
    stat = path.stat()
    return ScoredImage(name, stat.st_size, stat.st_mtime_ns, header.SOPInstanceUID,
                       header.SOPClassUID, header.SeriesInstanceUID, "PA", score, 2.5, False,
                       None)  # fmt: skip


@pytest.fixture(scope="module")
def real_studies(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Path, StudyResult]]:
    """Studies of real headers as the SR stage gets them: (name, archive, study). Besides
    one study per file of :data:`REAL_HEADERS`, RG1 with the Imager Pixel Spacing many CR
    devices write (an image library entry of a radiograph), and a study of RG1's two files
    (two images in one series), and RG1 in UTF-8 with names that are not ASCII."""
    studies = []
    for name in REAL_HEADERS:
        archive = tmp_path_factory.mktemp("real")
        header = pydicom.dcmread(real_file(name))
        studies.append((name, archive, _study([_scored(archive, name, header, 0.25)],
                                              uid=header.StudyInstanceUID)))  # fmt: skip
    archive = tmp_path_factory.mktemp("real")
    header = pydicom.dcmread(real_file("RG1_UNCR.dcm"))
    header.SpecificCharacterSet = "ISO_IR 192"
    header.PatientName, header.InstitutionName = "Gürtler^Jörg", "Hôpital Saint-Éloi"
    studies.append(("RG1 in UTF-8", archive, _study([_scored(archive, "utf8.dcm", header, 0.4)],
                                                    uid=header.StudyInstanceUID)))  # fmt: skip
    archive = tmp_path_factory.mktemp("real")
    header = pydicom.dcmread(real_file("RG1_UNCR.dcm"))
    header.ImagerPixelSpacing = [0.15, 0.15]
    image = _scored(archive, "spaced.dcm", header, 0.9)
    studies.append(("RG1 with Imager Pixel Spacing", archive,
                    _study([image], uid=header.StudyInstanceUID)))  # fmt: skip
    archive = tmp_path_factory.mktemp("real")
    images = [
        _scored(archive, name, pydicom.dcmread(real_file(name)), score)
        for name, score in (("RG1_UNCR.dcm", 0.7), ("RG1_J2KR.dcm", 0.6))
    ]
    studies.append(("RG1, two files", archive, _study(images, uid=header.StudyInstanceUID)))
    return studies


@pytest.fixture(scope="module")
def real_srs(
    real_studies: list[tuple[str, Path, StudyResult]], tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """The SRs of :func:`real_studies`, made as the scan makes them."""
    folder = tmp_path_factory.mktemp("real_srs")
    model = Algorithm("model-a", 0.5)
    paths = []
    for number, (_, archive, study) in enumerate(real_studies):
        uid = sr_instance_uid(content_digest(study, model))
        path = folder / f"{number}.dcm"
        path.write_bytes(encode_sr(study, archive, model, uid, 1, NOW))
        paths.append(path)
    return paths


def test_srs_from_real_headers_are_valid(
    real_studies: list[tuple[str, Path, StudyResult]], real_srs: list[Path]
) -> None:
    for (name, _, study), path in zip(real_studies, real_srs, strict=True):
        sr = pydicom.dcmread(path)
        assert sr.StudyInstanceUID == study.study_instance_uid, name
        assert nums(sr, "Pneumonia score") == [0.8, *(i.score for i in study.images)], name
        if shutil.which("dciodvfy"):
            assert dciodvfy_errors(path) == [], name
    libraries = [
        name
        for (name, _, _), path in zip(real_studies, real_srs, strict=True)
        if any(i.ConceptNameCodeSequence[0].CodeValue == "111028"
               for i in pydicom.dcmread(path).ContentSequence)
    ]  # fmt: skip
    # CT and MR are described in the image library, and so is a radiograph with its spacing
    # (not a secondary capture: its modality would be "Other", which CID 29 does not hold)
    assert libraries == ["CT_small.dcm", "MR_small.dcm", "RG1 with Imager Pixel Spacing"]


def differences(ours: Dataset, theirs: Dataset, where: str = "") -> list[str]:
    """Where two data sets differ, element by element and item by item (nothing of the
    creation times, which highdicom takes from the clock)."""
    found = []
    for tag in sorted(set(ours.keys()) | set(theirs.keys())):
        if tag not in ours or tag not in theirs:
            found.append(f"{where}{tag} only in {'ours' if tag in ours else 'theirs'}")
            continue
        a, b = ours[tag], theirs[tag]
        if a.keyword in CREATION_TIMES:
            continue
        if a.VR != b.VR:
            found.append(f"{where}{a.keyword}: VR {a.VR} != {b.VR}")
        elif a.VR == "SQ":
            if len(a.value) != len(b.value):
                found.append(f"{where}{a.keyword}: {len(a.value)} items != {len(b.value)}")
                continue
            for n, (x, y) in enumerate(zip(a.value, b.value, strict=True)):
                found += differences(x, y, f"{where}{a.keyword}[{n}].")
        elif a.value != b.value:
            found.append(f"{where}{a.keyword}: {a.value!r} != {b.value!r}")
    return found


def _reference(study: StudyResult, archive: Path, model: Algorithm, uid: str) -> Dataset:
    """The SR highdicom's full constructor makes, as written to a file and read back."""
    buffer = io.BytesIO()
    dcmwrite(buffer, build_sr(study, read_evidence(archive, study), model, uid, 2, NOW),
             enforce_file_format=True)  # fmt: skip
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def test_an_sr_from_the_template_equals_highdicoms(
    demo_srs: dict[str, Any], real_studies: list[tuple[str, Path, StudyResult]]
) -> None:
    """The SR the scan writes (the run's template, the study's values put in) is the data
    set highdicom's full constructor makes of the same study, element by element, but for
    the creation times: for every demo study and every real header."""
    model = _model(demo_srs)
    state = StateStore(demo_srs["out"] / STATE_FILE)
    try:
        rows = state.scored_study_images()
        demo = [("demo", demo_srs["archive"], study) for study in study_results(rows)]
    finally:
        state.close()
    template = SrTemplate(model, NOW)
    for name, archive, study in [*demo, *real_studies]:
        uid = sr_instance_uid(content_digest(study, model))
        ours = template.encode(study, read_evidence(archive, study), uid, 2)
        fast = pydicom.dcmread(io.BytesIO(ours))
        full = _reference(study, archive, model, uid)
        assert differences(fast, full) == [], name
        assert differences(fast.file_meta, full.file_meta) == [], name
        assert fast.preamble == full.preamble


def test_the_sr_identifies_the_algorithm_as_ihe_ai_results_asks(
    demo_srs: dict[str, Any],
) -> None:
    """IHE AIR (Rev. 1.1, 6.5.3.1): the algorithm in the Contributing Equipment Sequence
    with purpose (Newcode1, 99IHE), manufacturer, model name, software versions and a Device
    UID, the same values as the content tree's device observer and algorithm; the Device UID
    is the model's; Content Date and Time are the time of analysis (the run's start)."""
    manifest = json.loads((demo_srs["out"] / "manifest.json").read_text())
    model = _model(demo_srs)
    started = datetime.fromisoformat(manifest["started_at"]).astimezone()
    for path in sr_files(demo_srs["outbox"]):
        sr = pydicom.dcmread(path)
        ours = [
            item
            for item in sr.ContributingEquipmentSequence
            if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
        ]
        assert len(ours) == 1
        item = ours[0]
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
            "99IHE", "Processing Algorithm"
        )  # fmt: skip
        assert item.Manufacturer == "batchscan"
        assert item.ManufacturerModelName == "batchscan pneumonia CNN"
        assert item.SoftwareVersions == model.model_version
        assert item.DeviceUID == device_uid(model)
        observed = {
            i.ConceptNameCodeSequence[0].CodeMeaning: i.get("UID", i.get("TextValue"))
            for i in content_items(sr)
        }
        assert observed["Device Observer UID"] == item.DeviceUID
        assert observed["Device Observer Manufacturer"] == item.Manufacturer
        assert observed["Device Observer Model Name"] == item.ManufacturerModelName
        assert observed["Algorithm Name"] == item.ManufacturerModelName
        assert observed["Algorithm Version"] == item.SoftwareVersions
        assert "99IHE" in {s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence}
        assert (sr.ContentDate, sr.ContentTime[:6]) == (
            started.strftime("%Y%m%d"), started.strftime("%H%M%S")
        )  # fmt: skip
    other = Algorithm("pneumonia_cnn_site-0123456789ab", model.threshold)
    assert device_uid(other) != device_uid(model)
    assert device_uid(other).startswith("2.25.") and len(device_uid(other)) <= 64
    assert device_uid(Algorithm(model.model_version, 0.5, "9.9")) == device_uid(model)


@pytest.fixture(scope="module")
def scanned_real_srs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The SRs of a scan of real files (pydicom-data's RG1, a chest PA in two transfer
    syntaxes, and RG3, an extremity the scan skips)."""
    root = tmp_path_factory.mktemp("scanned_real")
    archive = root / "archive"
    archive.mkdir()
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm"):
        shutil.copy(real_file(name), archive / name)
    code = main(["scan", str(archive), "--out", str(root / "out"), "--sr-out", str(root / "sr"),
                 "--workers", "0", "--no-progress"])  # fmt: skip
    assert code == 0
    return sr_files(root / "sr")


@pytest.mark.slow
def test_every_kind_of_sr_passes_pixelmed_and_dciodvfy(
    demo_srs: dict[str, Any], scanned_real_srs: list[Path], real_srs: list[Path]
) -> None:
    """Pixelmed's DicomSRValidator (TID 1500 and the templates it includes, their context
    groups) prints no Error and no Warning, and dciodvfy no Error, on every SR: the demo's,
    a scan's of real files, and those of real headers. Pixelmed checks the tree's structure
    and codes, so of SRs with the same tree shape one is given to it (it takes seconds a
    file); dciodvfy sees them all."""
    every = [*sr_files(demo_srs["outbox"]), *scanned_real_srs, *real_srs]
    assert len(scanned_real_srs) == 1 and len(every) == 6 + 1 + len(real_srs)
    for path in every:
        assert dciodvfy_errors(path) == [], path
    shapes: dict[tuple[object, ...], Path] = {}
    for path in every:
        shapes.setdefault(tree_shape(pydicom.dcmread(path)), path)
    findings = pixelmed_findings(list(shapes.values()))
    assert findings == {path: [] for path in shapes.values()}


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

    data = encode_sr(study, archive, Algorithm("m", 0.5), "2.25.1", 1, NOW)
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    sr = pydicom.dcmread(path)
    assert (sr.StudyDate, sr.StudyTime, sr.PatientBirthDate, sr.PatientSex) == ("", "", "", "")
    assert sr.PatientID == ds.PatientID
    if shutil.which("dciodvfy"):
        assert [e for e in dciodvfy_errors(path) if "Person Name" not in e] == []
    printed = capsys.readouterr()
    seen = printed.out + printed.err + caplog.text
    assert "Odd" not in seen and "male" not in seen and "19701399" not in seen, seen


def test_srs_made_in_worker_processes_are_the_same_srs(
    demo_srs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large run makes its first SRs in the scan's process, the others in worker
    processes (after two, in batches of two here): the SRs are those of one process."""
    monkeypatch.setattr(write, "JOBS_PER_FLUSH", 2)
    monkeypatch.setattr(write, "POOL_AFTER", 2)
    pools = []

    class Pool(ProcessPoolExecutor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pools.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(write, "ProcessPoolExecutor", Pool)
    run = _copy_scanned(demo_srs, tmp_path)
    shutil.rmtree(run["outbox"])
    state = StateStore(run["out"] / STATE_FILE)
    started = datetime.fromisoformat(
        json.loads((run["out"] / "manifest.json").read_text())["started_at"]
    )
    try:
        outcome = write_srs(state, run["archive"], run["outbox"], _model(run), "t", workers=2,
                            analysed_at=started)  # fmt: skip
    finally:
        state.close()
    assert (outcome.written, outcome.unchanged) == (6, 0)
    assert len(pools) == 1, "the second and third batches were made in worker processes"
    for ours, theirs in zip(sr_files(run["outbox"]), sr_files(demo_srs["outbox"]), strict=True):
        assert differences(pydicom.dcmread(ours), pydicom.dcmread(theirs)) == []
    assert [p.relative_to(run["outbox"]) for p in sr_files(run["outbox"])] == [
        p.relative_to(demo_srs["outbox"]) for p in sr_files(demo_srs["outbox"])
    ]
