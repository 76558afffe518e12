"""``batchscan scan URL`` and ``batchscan send --stow URL`` against a real PACS: Orthanc with
its DICOMweb plugin on 127.0.0.1 (a config the test writes, a password, C-FIND/C-GET for
batchscan's AE), through the command line.

What a PACS scan must do as a folder scan does, and what it must do besides:

* the same study scores as a scan of a folder of the same files (within 1e-4), over
  DICOMweb and over DIMSE; every instance the query returns is a row (scored, or skipped or
  failed with a reason) under its ``STUDY/SERIES/SOP`` locator; report.html draws its
  pictures and ``--sr-out`` writes its SRs as for the folder; nothing is written to the
  PACS; the credentials appear in no output, log or file;
* a night asks from the high-water mark less the margin: only the new study is fetched
  (Orthanc's own log counts what it sent); an instance gone from the PACS within the window
  leaves the reports, one outside the window stays;
* Orthanc killed mid-run: exit 1 in one line naming the PACS, what was scored kept; after
  a restart the next run fetches only the rest and ends with the folder's scores;
* HTTPS and DICOM TLS; STOW-RS delivery of the scan's SRs by ``send --stow``; ``--engine
  ray`` with the fetches on Ray's workers.

(The state's side of a window, without a PACS: tests/test_state.py.)
"""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
import pytest

from batchscan.cli import main
from batchscan.ingest.sources import Locator
from tests.conftest import credentials_file, load_job

pacs_job = load_job("common/orthanc")
dicom_files = pacs_job.dicom_files
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        pacs_job.dicomweb_missing() is not None,
        reason=f"{pacs_job.dicomweb_missing()}; bash tests/debian-tools.sh installs it (as root)",
    ),
]

USER, PASSWORD = "nightly", "pw-Kx7#not-in-any-output"
READER = "BATCHSCAN"
#: The secret in every form it could leak in: as written, and as HTTP basic sends it.
SECRETS = (PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())


def load(server: Any, files: list[Path]) -> None:
    """Store the files in the PACS (its own import; one it refuses is not in the PACS)."""
    for path in files:
        with contextlib.suppress(OSError):
            server.upload([path])


@pytest.fixture(scope="module")
def archive(small_demo: Path) -> Path:
    return small_demo


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return credentials_file(tmp_path_factory.mktemp("secret"), USER, PASSWORD)


@pytest.fixture(scope="module")
def folder_scan(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The folder scan of the same files (with SRs): what a PACS scan must equal."""
    root = tmp_path_factory.mktemp("folder_scan")
    out, sr = root / "reports", root / "sr"
    argv = ["scan", str(archive), "--out", str(out), "--sr-out", str(sr), "--workers", "1"]
    assert main([*argv, "--no-progress"]) == 0
    return {"out": out, "sr": sr}


@pytest.fixture(scope="module")
def pacs(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Orthanc for the module, holding the demo archive, logging what it sends."""
    server = pacs_job.Orthanc(
        tmp_path_factory.mktemp("orthanc"), dicomweb=True, users={USER: PASSWORD},
        reader_aet=READER, verbose=True,
    )  # fmt: skip
    with server:
        load(server, dicom_files(archive))
        yield server


def scan(url: str, out: Path, credentials: Path, *extra: str) -> int:
    """``batchscan scan URL --out OUT`` with the credentials, one decode process."""
    argv = ["scan", url, "--out", str(out), "--pacs-credentials", str(credentials)]
    argv += ["--calling-aet", READER, "--workers", "1", "--no-progress", "--pacs-timeout", "5"]
    return main([*argv, *extra])


def radiographs_stored(server: Any) -> int:
    """The CR and DX instances the PACS holds: what the default query lists."""
    return sum(
        len(series["Instances"])
        for series in server.get("/series?expand")
        if series["MainDicomTags"].get("Modality") in ("CR", "DX")
    )


def study_scores(out: Path) -> pd.Series:
    studies = pd.read_parquet(out / "studies.parquet")
    return studies.set_index("study_instance_uid")["score"].sort_index()


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def assert_no_secret(*texts: str | bytes, folders: tuple[Path, ...] = ()) -> None:
    """No form of the password in any text, nor in any file under the folders (reports,
    state, store, SRs, logs: read as bytes)."""
    blobs = [t.encode() if isinstance(t, str) else t for t in texts]
    blobs += [p.read_bytes() for f in folders for p in f.rglob("*") if p.is_file()]
    for secret in SECRETS:
        assert not any(secret.encode() in blob for blob in blobs), "a credential leaked"


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_a_pacs_scan_scores_every_study_as_the_folder_scan_does(
    protocol: str,
    pacs: Any,
    archive: Path,
    credentials: Path,
    folder_scan: dict[str, Path],
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")  # every logger, dicomweb-client's, urllib3's and pynetdicom's
    url = pacs.dicomweb_url if protocol == "dicomweb" else pacs.dimse_url
    out, sr = tmp_path / "reports", tmp_path / "sr"
    stored, sent = pacs.stored(), len(pacs.fetches())
    assert scan(url, out, credentials, "--sr-out", str(sr)) == 0
    printed = capfd.readouterr()
    # the same study scores as the folder's
    ours, theirs = study_scores(out), study_scores(folder_scan["out"])
    assert list(ours.index) == list(theirs.index)
    assert (ours - theirs).abs().max() <= 1e-4
    # every instance the query returned is a row, decided, under its locator
    facts = manifest(out)
    images = pd.read_parquet(out / "images.parquet")
    assert len(images) == facts["pacs"]["instances_listed"] == radiographs_stored(pacs)
    assert set(images["status"]) <= {"scored", "skipped", "failed"}
    assert images.loc[images["status"] != "scored", "reason"].notna().all()
    for path, sop in zip(images["path"], images["sop_instance_uid"], strict=True):
        assert Locator.from_path(path).sop_instance_uid == sop
    failed = images[images["status"] == "failed"]
    if protocol == "dimse":  # Orthanc 1.10's DCMTK cannot send HTJ2K by C-STORE
        assert list(failed["reason"]) == ["fetch_error:status_0xA702"]
        assert failed["study_instance_uid"].notna().all(), "a failed fetch names its study"
    else:
        assert failed.empty
    assert facts["arguments"]["archive"] == url
    assert facts["pacs"]["source"] == url and facts["pacs"]["window"] == [None, None]
    assert facts["pacs"]["high_water"] == date.today().isoformat()
    assert f"PACS {url}: {len(images)} instances listed" in printed.out
    # each instance fetched once by the scan (the pictures of report.html: a few more)
    fetched = pacs.fetches()[sent:]
    assert len(fetched) >= len(images) - len(failed)
    # report.html draws its pictures and the SR stage its SRs, as for the folder
    page, folder_page = (o / "report.html" for o in (out, folder_scan["out"]))
    assert page.read_text().count("data:image/") == folder_page.read_text().count("data:image/")
    assert facts["sr"]["written"] == manifest(folder_scan["out"])["sr"]["written"] > 0
    assert facts["sr"]["not_written"] == 0
    assert sorted(p.name for p in sr.rglob("*.dcm")) == sorted(
        p.name for p in folder_scan["sr"].rglob("*.dcm")
    ), "the same SRs (their UIDs are digests of the scored content)"
    # nothing written to the PACS, no credential anywhere
    assert pacs.stored() == stored
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert_no_secret(printed.out, printed.err, logs, folders=(out, sr))
    # a rerun over every date fetches nothing it scored (a failed fetch is tried again)
    sent = len(pacs.fetches())
    assert scan(url, out, credentials, "--since", "1900-01-01") == 0
    assert manifest(out)["files_processed"] == len(failed)
    assert len(pacs.fetches()) - sent <= len(failed)


def new_study(archive: Path, folder: Path, day: date) -> Path:
    """A copy of a demo chest PA as a study of its own, dated `day`."""
    source = next(p for p in dicom_files(archive) if p.match("*/1/IM0000"))
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.AccessionNumber = "NIGHT1"
    ds.StudyDate = day.strftime("%Y%m%d")
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_night_fetches_only_the_new_study_and_forgets_only_what_left_its_window(
    pacs: Any, archive: Path, credentials: Path, tmp_path: Path
) -> None:
    out = tmp_path / "reports"
    assert scan(pacs.dicomweb_url, out, credentials) == 0
    first = pd.read_parquet(out / "images.parquet")
    # a study of today arrives; the night asks from today less the margin
    added = pacs.upload([new_study(archive, tmp_path, date.today())])[0]
    sent = len(pacs.fetches())
    try:
        assert scan(pacs.dicomweb_url, out, credentials) == 0
        assert pacs.fetches()[sent:] == [added], "only the new study is fetched"
        night = manifest(out)
        assert night["pacs"]["window"][0] < date.today().isoformat() <= night["pacs"]["high_water"]
        assert (night["files_processed"], night["files_removed"]) == (1, 0)
        images = pd.read_parquet(out / "images.parquet")
        assert len(images) == len(first) + 1, "the studies outside the window stay"
        assert "NIGHT1" in set(pd.read_parquet(out / "studies.parquet")["accession_number"])
    finally:
        pacs.delete(added)
    # gone from the PACS within the window: gone from the reports, as a deleted file
    assert scan(pacs.dicomweb_url, out, credentials) == 0
    assert manifest(out)["files_removed"] == 1
    assert "NIGHT1" not in set(pd.read_parquet(out / "studies.parquet")["accession_number"])
    # a backfill over every date finds the rest still there and fetches none of it
    sent = len(pacs.fetches())
    assert scan(pacs.dicomweb_url, out, credentials, "--since", "1900-01-01") == 0
    assert (manifest(out)["files_removed"], len(pacs.fetches())) == (0, sent)
    assert len(pd.read_parquet(out / "images.parquet")) == len(first)


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_orthanc_killed_mid_run_stops_the_run_and_the_next_run_loses_nothing(
    protocol: str,
    archive: Path,
    credentials: Path,
    folder_scan: dict[str, Path],
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
) -> None:
    server = pacs_job.Orthanc(
        tmp_path / "orthanc", dicomweb=True, users={USER: PASSWORD}, reader_aet=READER,
        verbose=True,
    )  # fmt: skip
    server.start()
    try:
        load(server, dicom_files(archive))
        url = server.dicomweb_url if protocol == "dicomweb" else server.dimse_url
        killed = threading.Event()

        def kill_after_three_fetches() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(server.fetches()) < 3:
                time.sleep(0.005)
            server.stop(kill=True)
            killed.set()

        killer = threading.Thread(target=kill_after_three_fetches, daemon=True)
        killer.start()
        out = tmp_path / "reports"
        status = scan(url, out, credentials)
        killer.join()
        err = capfd.readouterr().err
        assert killed.is_set() and status == 1
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"batchscan: error: PACS {url} "), line
        assert not (out / "studies.parquet").exists(), "nothing published by a failed run"
        assert_no_secret(err)
        with sqlite3.connect(out / "state.sqlite") as db:
            kept = db.execute(
                "SELECT COUNT(*) FROM files WHERE reason IS NULL OR reason NOT LIKE 'fetch%'"
            ).fetchone()[0]
        assert kept >= 1, "what was scored before the PACS went is kept"
        server.start()
        before = len(server.fetches())
        assert scan(url, out, credentials) == 0
        again = manifest(out)
        assert again["files_reused"] == kept, "none of it fetched again"
        assert again["files_processed"] == again["files_found"] - kept
        # each of the rest fetched once (over DIMSE the HTJ2K one may fail), and the
        # flagged studies' images again for the maps of report.html (kept for later pages)
        fetched = len(server.fetches()) - before
        studies = pd.read_parquet(out / "studies.parquet")
        pictures = int(studies.loc[studies["flag"], "n_images_scored"].clip(upper=3).sum())
        assert again["files_processed"] - (protocol == "dimse") <= fetched
        assert fetched <= again["files_processed"] + pictures
        ours, theirs = study_scores(out), study_scores(folder_scan["out"])
        assert list(ours.index) == list(theirs.index)
        assert (ours - theirs).abs().max() <= 1e-4, "nothing lost, nothing scored twice"
    finally:
        server.stop()


def test_a_scan_over_https_and_over_dicom_tls(
    archive: Path, credentials: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    pki = pacs_job.make_pki(tmp_path / "pki")
    radiographs = [p for p in dicom_files(archive) if p.match("*/ACC100[01]/*/IM*")]
    tls = ["--tls-ca", str(pki.ca)]
    with pacs_job.Orthanc(
        tmp_path / "https", dicomweb=True, users={USER: PASSWORD}, https=pki
    ) as server:
        load(server, radiographs)
        assert server.dicomweb_url.startswith("https://")
        assert scan(server.dicomweb_url, tmp_path / "web", credentials, *tls) == 0
        assert len(pd.read_parquet(tmp_path / "web" / "images.parquet")) == len(radiographs)
        # the system's CAs do not know the test's CA: one line, exit 1
        assert scan(server.dicomweb_url, tmp_path / "untrusted", credentials) == 1
        assert "failed the TLS check" in capfd.readouterr().err
    client = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    with pacs_job.Orthanc(tmp_path / "dicom-tls", tls=pki, reader_aet=READER) as server:
        load(server, radiographs)
        assert scan(server.dimse_url, tmp_path / "dimse", credentials, *tls, *client) == 0
        images = pd.read_parquet(tmp_path / "dimse" / "images.parquet")
        assert len(images) == len(radiographs) and images["status"].ne("failed").all()
    web, dimse = study_scores(tmp_path / "web"), study_scores(tmp_path / "dimse")
    assert (web - dimse).abs().max() <= 1e-4


def test_send_stow_delivers_a_pacs_scans_srs_once(
    archive: Path, credentials: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pacs_job.Orthanc(
        tmp_path / "orthanc", dicomweb=True, users={USER: PASSWORD}, reader_aet=READER
    ) as server:
        load(server, [p for p in dicom_files(archive) if p.match("*/ACC100[01]/*/IM*")])
        sr = tmp_path / "sr"
        reports = tmp_path / "reports"
        assert scan(server.dicomweb_url, reports, credentials, "--sr-out", str(sr)) == 0
        written = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in sr.rglob("*.dcm"))
        assert len(written) == 2
        before = set(server.sop_instance_uids())
        send = ["send", str(sr), "--stow", server.dicomweb_url]
        assert main(send) == 1, "no credentials: the PACS refuses them, nothing recorded"
        err = capsys.readouterr().err
        assert "refused the credentials" in err and err.count("\n") == 1
        assert main([*send, "--pacs-credentials", str(credentials)]) == 0
        assert set(server.sop_instance_uids()) - before == set(written)
        assert "sent 2 SRs" in capsys.readouterr().out
        assert main([*send, "--pacs-credentials", str(credentials)]) == 0, "nothing left"
        assert "sent 0 SRs" in capsys.readouterr().out


def test_the_ray_engine_fetches_on_its_workers_and_scores_as_the_folder(
    local_ray: None,
    pacs: Any,
    credentials: Path,
    folder_scan: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the actors import the stages afresh; a fetch in this process would be a failed row
    from batchscan.engines import fetch

    def not_here(*args: Any) -> None:
        raise AssertionError("an instance was fetched in the scan's own process")

    monkeypatch.setattr(fetch.FetchingPrepare, "__call__", not_here)
    out = tmp_path / "reports"
    assert scan(pacs.dicomweb_url, out, credentials, "--engine", "ray") == 0
    ours, theirs = study_scores(out), study_scores(folder_scan["out"])
    assert list(ours.index) == list(theirs.index)
    assert (ours - theirs).abs().max() <= 1e-4
    assert manifest(out)["engine"]["name"] == "ray"
