"""A PACS as the archive (batchscan.ingest.sources): a real Orthanc with its DICOMweb plugin
on 127.0.0.1, found and fetched over DICOMweb and over DIMSE, scored as a folder of the same
files is; a night with one new study; Orthanc killed mid-run and restarted; TLS; STOW-RS
delivery of the SRs; bad answers from a small local HTTP server; and credentials that never
appear in any message or log."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest

from batchscan.cli import main
from batchscan.engines.pipeline import prepare_display
from batchscan.ingest.header import StageOptions
from batchscan.ingest.records import ImageRecord
from batchscan.ingest.sources import (
    FetchError,
    Locator,
    PacsSource,
    PacsUnavailableError,
    SourceConfigError,
    SourceOptions,
    Window,
    fetch_all,
    is_pacs_url,
    open_source,
    redact_url,
)
from batchscan.ingest.sources.credentials import Credentials
from batchscan.ingest.sources.dicomweb import single_part
from batchscan.pacs.outbox import Outbox
from batchscan.pacs.send import SendError, send_stow
from tests.conftest import credentials_file, load_job

pacs_job = load_job("common/orthanc")
dicom_files = pacs_job.dicom_files
needs_dicomweb = pytest.mark.skipif(
    pacs_job.dicomweb_missing() is not None,
    reason=f"{pacs_job.dicomweb_missing()}; bash tests/debian-tools.sh installs it (as root)",
)

USER, PASSWORD = "scanner", "pw-Zq8!never-logged"
READER = "BATCHSCAN"


@pytest.fixture(scope="module")
def archive(small_demo: Path) -> Path:
    return small_demo


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return credentials_file(tmp_path_factory.mktemp("secret"), USER, PASSWORD)


@pytest.fixture(scope="module")
def pacs(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Orthanc with DICOMweb, a password and C-FIND/C-GET for batchscan's AE, holding every
    DICOM file of the demo archive that it accepts."""
    if problem := pacs_job.dicomweb_missing():
        pytest.skip(problem)
    server = pacs_job.Orthanc(
        tmp_path_factory.mktemp("orthanc"), dicomweb=True, users={USER: PASSWORD},
        reader_aet=READER,
    )  # fmt: skip
    server.start()
    for path in dicom_files(archive):
        with contextlib.suppress(OSError):  # one this Orthanc refuses is not in the PACS
            server.upload([path])
    yield server
    server.stop()


def web_source(pacs: Any, credentials: Path, **options: Any) -> PacsSource:
    return open_source(pacs.dicomweb_url, SourceOptions(credentials=credentials, **options))


def dimse_source(pacs: Any, **options: Any) -> PacsSource:
    return open_source(pacs.dimse_url, SourceOptions(calling_aet=READER, **options))


STAGES = StageOptions()


def folder_inputs(archive: Path) -> dict[str, np.ndarray]:
    """Model inputs of the folder scan's stages, by SOP Instance UID."""
    found = {}
    for path in dicom_files(archive):
        record = ImageRecord(path=path.name, abs_path=str(path))
        info = path.stat()
        record.size, record.mtime_ns = info.st_size, info.st_mtime_ns
        prepared = prepare_display(record, STAGES)
        if prepared is not None:
            found[str(record.sop_instance_uid)] = prepared[1]
    return found


def pacs_records(source: PacsSource) -> list[tuple[ImageRecord, Any]]:
    """Every instance the source finds, through the same stages: (record, model input)."""
    out = []
    for locator, got in fetch_all(source, source.find(Window()), connections=3):
        record = locator.record()
        if isinstance(got, FetchError):
            out.append((record.fail(got.reason, got.detail), None))
            continue
        prepared = prepare_display(record, STAGES, got)
        out.append((record, None if prepared is None else prepared[1]))
    return out


def scores(*inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The shipped model's scores of each list of inputs (one model, one call)."""
    from batchscan.scoring.infer import Scorer
    from batchscan.scoring.model import load_model

    scorer = Scorer(load_model(), batch_size=64, jit_compile=False)
    every = np.asarray(scorer.score(np.concatenate([np.stack(i) for i in inputs])))
    return np.split(every, np.cumsum([len(i) for i in inputs])[:-1])


# -- the scan's two halves against a real PACS ---------------------------------------------


@needs_dicomweb
@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_a_pacs_scores_what_a_folder_of_the_same_files_scores(
    protocol: str, pacs: Any, archive: Path, credentials: Path
) -> None:
    source = (  # over DIMSE the credentials travel as user identity negotiation
        web_source(pacs, credentials)
        if protocol == "dicomweb"
        else dimse_source(pacs, credentials=credentials)
    )
    try:
        records = pacs_records(source)
    finally:
        source.close()
    folder = folder_inputs(archive)
    assert records, "the query found the radiographs"
    # every instance found is accounted for: scored, or skipped or failed with a reason
    for record, tensor in records:
        assert (tensor is not None) == record.pending, record
        assert record.pending or record.reason
        assert Locator.from_path(record.path).sop_instance_uid == record.sop_instance_uid or (
            record.sop_instance_uid is None and record.status == "failed"
        )
    fetched = {r.sop_instance_uid: t for r, t in records if t is not None}
    failed = [r for r, t in records if r.status == "failed"]
    if protocol == "dimse":  # Orthanc 1.10's DCMTK cannot send HTJ2K by C-STORE
        assert all(r.reason.startswith("fetch_error:") for r in failed), failed
        assert len(failed) <= 1
    else:
        assert not failed
    assert len(fetched) >= 5
    for uid, tensor in fetched.items():
        assert np.array_equal(tensor, folder[uid]), "the same model input as from the file"
    uids = sorted(fetched)
    from_pacs, from_folder = scores([fetched[u] for u in uids], [folder[u] for u in uids])
    assert np.abs(from_pacs - from_folder).max() <= 1e-4


@needs_dicomweb
@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_chest_radiograph_modalities_by_default_every_modality_when_asked(
    protocol: str, pacs: Any, credentials: Path
) -> None:
    def found(**options: Any) -> list[Locator]:
        source = (
            web_source(pacs, credentials, **options)
            if protocol == "dicomweb"
            else dimse_source(pacs, **options)
        )
        try:
            return list(source.find(Window()))
        finally:
            source.close()

    default, every = found(), found(modalities=())
    assert {loc.modality for loc in default} == {"CR", "DX"}
    assert {loc.modality for loc in every} == {"CR", "DX", "CT"}
    assert len({loc.path for loc in every}) == len(every), "each instance once"
    assert all(len(loc.path.split("/")) == 3 for loc in every)


@needs_dicomweb
def test_a_night_asks_from_the_high_water_mark_less_the_margin(
    pacs: Any, credentials: Path, archive: Path, tmp_path: Path
) -> None:
    source = web_source(pacs, credentials)
    try:
        first = list(source.find(Window()))
        high_water = max(date.fromisoformat(str(loc.study_date)) for loc in first)
        # one new study arrives, dated after the mark
        new = pydicom.dcmread(dicom_files(archive)[0])
        new.StudyInstanceUID = new.SeriesInstanceUID = new.SOPInstanceUID = None
        new.StudyInstanceUID = pydicom.uid.generate_uid()
        new.SeriesInstanceUID = pydicom.uid.generate_uid()
        new.SOPInstanceUID = new.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        new.StudyDate = high_water.replace(year=high_water.year + 1).strftime("%Y%m%d")
        new.Modality = "CR"
        path = tmp_path / "new.dcm"
        new.save_as(path, enforce_file_format=True)
        orthanc_id = pacs.upload([path])[0]
        try:
            night = list(source.find(Window.nightly(high_water, margin_days=0)))
            studies = {loc.study_instance_uid for loc in night}
            assert new.StudyInstanceUID in studies
            latest = {loc.study_instance_uid for loc in first if loc.study_date == str(high_water)}
            assert studies == latest | {new.StudyInstanceUID}, "only the mark's day and after"
            margin = list(source.find(Window.nightly(high_water, margin_days=400)))
            assert len(margin) == len(first) + 1, "a margin reaches back over late arrivals"
            backfill = list(source.find(Window(since=date(1900, 1, 1), until=high_water)))
            assert {loc.path for loc in backfill} == {loc.path for loc in first}
        finally:
            pacs.delete(orthanc_id)
    finally:
        source.close()


@needs_dicomweb
@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_a_pacs_killed_mid_run_stops_the_run_in_one_line_and_a_restart_goes_on(
    protocol: str, tmp_path: Path, archive: Path, credentials: Path
) -> None:
    server = pacs_job.Orthanc(
        tmp_path / "orthanc", dicomweb=True, users={USER: PASSWORD}, reader_aet=READER
    )
    server.start()
    try:
        server.upload([p for p in dicom_files(archive) if "CT" not in p.name][:8])
        source = web_source(server, credentials) if protocol == "dicomweb" else (
            dimse_source(server, connect_timeout=2.0, answer_timeout=5.0))  # fmt: skip
        locators = list(source.find(Window()))
        done: list[str] = []
        with pytest.raises(PacsUnavailableError) as stopped:
            for locator, _ in fetch_all(source, locators, connections=1):
                done.append(locator.path)
                if len(done) == 2:
                    server.stop(kill=True)
        message = str(stopped.value)
        assert message.startswith(f"PACS {source.name} ") and "\n" not in message
        assert PASSWORD not in message and USER not in message
        assert 2 <= len(done) < len(locators)
        server.start()
        rest = [loc for loc in locators if loc.path not in done]
        results = dict(fetch_all(source, rest, connections=2))
        assert all(isinstance(v, bytes) or v.reason.startswith("fetch_error") for v in
                   results.values())  # fmt: skip
        assert len(results) == len(rest)
        source.close()
    finally:
        server.stop()


# -- TLS -----------------------------------------------------------------------------------


@needs_dicomweb
def test_dicomweb_over_https_checks_the_pacs_certificate(
    tmp_path: Path, archive: Path, credentials: Path
) -> None:
    pki = pacs_job.make_pki(tmp_path / "pki")
    with pacs_job.Orthanc(
        tmp_path / "orthanc", dicomweb=True, users={USER: PASSWORD}, https=pki
    ) as server:
        server.upload(dicom_files(archive)[:3])
        assert server.dicomweb_url.startswith("https://")
        source = web_source(server, credentials, ca=pki.ca)
        found = list(source.find(Window(None, None)))
        assert found
        assert all(isinstance(got, bytes) for _, got in fetch_all(source, found))
        source.close()
        untrusted = web_source(server, credentials)  # the system's CAs do not know it
        with pytest.raises(PacsUnavailableError, match="TLS"):
            list(untrusted.find(Window()))


@needs_dicomweb
def test_dimse_over_dicom_tls_with_a_client_certificate(tmp_path: Path, archive: Path) -> None:
    pki = pacs_job.make_pki(tmp_path / "pki")
    with pacs_job.Orthanc(tmp_path / "orthanc", tls=pki, reader_aet=READER) as server:
        server.upload(dicom_files(archive)[:3])
        source = dimse_source(server, ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        found = list(source.find(Window()))
        assert found
        assert all(isinstance(got, bytes) for _, got in fetch_all(source, found))
        source.close()
        plain = dimse_source(server, connect_timeout=2.0, answer_timeout=2.0)
        with pytest.raises(PacsUnavailableError):
            list(plain.find(Window()))


# -- STOW-RS -------------------------------------------------------------------------------


@needs_dicomweb
def test_stow_rs_delivers_each_sr_once_through_an_outage(
    demo_srs: dict[str, Path], tmp_path: Path, credentials: Path
) -> None:
    outbox = tmp_path / "outbox"
    shutil.copytree(demo_srs["outbox"], outbox)
    server = pacs_job.Orthanc(tmp_path / "orthanc", dicomweb=True, users={USER: PASSWORD})
    server.start()
    try:
        url = server.dicomweb_url
        stored: list[str] = []

        def kill_after_two(item: Any) -> None:
            stored.append(item.sop_instance_uid)
            if len(stored) == 2:
                server.stop(kill=True)

        with pytest.raises(SendError) as stopped:
            send_stow(outbox, url, credentials, on_stored=kill_after_two, connect_timeout=2)
        assert "SRs left to send" in str(stopped.value) and PASSWORD not in str(stopped.value)
        with Outbox(outbox) as ledger:
            assert ledger.count("deliveries") == 2
        server.start()
        outcome = send_stow(outbox, url, credentials)
        assert outcome.sent == 4 and outcome.left == 0
        assert sorted(server.sop_instance_uids()) == sorted(
            pydicom.dcmread(p).SOPInstanceUID for p in outbox.glob("*/*.dcm")
        )
        assert send_stow(outbox, url, credentials).sent == 0, "nothing twice"
        wrong = tmp_path / "wrong"
        wrong.write_text(f"{USER}:not-the-password\n")
        shutil.rmtree(outbox)
        shutil.copytree(demo_srs["outbox"], outbox)
        with pytest.raises(SendError, match="refused the credentials"):
            send_stow(outbox, url, wrong)
        with Outbox(outbox) as ledger:
            assert ledger.count("deliveries") == 0
    finally:
        server.stop()


# -- bad answers ---------------------------------------------------------------------------


class _Pacs(http.server.BaseHTTPRequestHandler):
    """A DICOMweb PACS that answers each instance in its own wrong way."""

    instance = b""
    boundary = "b0undary"
    #: Whether its searches list one CR series of instances 1.1 to 1.10 (else nothing).
    listed = False

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        level = self.path.split("?")[0].rsplit("/", 1)[-1]
        if level in ("studies", "series", "instances"):
            listing = {
                "studies": [{"0020000D": {"vr": "UI", "Value": ["1"]}}],
                "series": [{"0020000E": {"vr": "UI", "Value": ["2"]},
                            "00080060": {"vr": "CS", "Value": ["CR"]}}],
                "instances": [{"00080018": {"vr": "UI", "Value": [sop]}} for sop in BAD_ANSWERS],
            }  # fmt: skip
            body = json.dumps(listing[level] if self.listed else []).encode()
            self._send(200, body, {"Content-Type": "application/dicom+json"})
            return
        kind = self.path.rsplit("/", 1)[-1]
        part = (f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + self.instance + f"\r\n--{self.boundary}--\r\n".encode())  # fmt: skip
        related = f'multipart/related; type="application/dicom"; boundary={self.boundary}'
        if kind == "1.1":  # a good answer
            self._send(200, part, {"Content-Type": related, "Content-Length": str(len(part))})
        elif kind == "1.2":  # wrong content type
            self._send(200, b"<html>login</html>", {"Content-Type": "text/html"})
        elif kind == "1.3":  # broken multipart: no boundary parameter
            self._send(200, part, {"Content-Type": "multipart/related"})
        elif kind == "1.4":  # truncated: fewer bytes than announced, then the connection closes
            self._send(200, part[: len(part) // 2],
                       {"Content-Type": related, "Content-Length": str(len(part))})  # fmt: skip
            self.close_connection = True
        elif kind == "1.5":  # huge: announced beyond the cap
            self._send(200, b"", {"Content-Type": related, "Content-Length": str(10**12)})
        elif kind == "1.6":  # huge without a length: streams past the cap
            self.send_response(200)
            self.send_header("Content-Type", related)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 65536)
            self.close_connection = True
        elif kind == "1.7":  # hung: headers, then silence
            self.send_response(200)
            self.send_header("Content-Type", related)
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            time.sleep(3)
        elif kind == "1.8":  # two parts for one instance
            two = part.replace(f"--{self.boundary}--".encode(), b"") + part
            self._send(200, two, {"Content-Type": related})
        elif kind == "1.9":  # gone
            self._send(404, b"", {})
        else:  # the last part never closes
            cut = part[: -len(f"--{self.boundary}--\r\n")]
            self._send(200, cut, {"Content-Type": related})


#: What each instance of :class:`_Pacs` is (None: a good answer), with a 1 MiB cap.
BAD_ANSWERS: dict[str, str | None] = {
    "1.1": None,
    "1.2": "fetch_error:content_type",
    "1.3": "fetch_error:bad_multipart",
    "1.4": "fetch_error:truncated",
    "1.5": "too_large",
    "1.6": "too_large",  # 4 MiB with no length: within a scan's cap, so bad there
    "1.7": "fetch_error:timeout",
    "1.8": "fetch_error:bad_multipart",
    "1.9": "fetch_error:not_found",
    "1.10": "fetch_error:truncated",
}


@pytest.fixture
def bad_pacs(archive: Path) -> Iterator[str]:
    _Pacs.instance = dicom_files(archive)[0].read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Pacs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    server.shutdown()
    server.server_close()


def test_every_bad_answer_is_a_failed_row_with_a_reason(bad_pacs: str) -> None:
    source = open_source(bad_pacs, SourceOptions(answer_timeout=1.0, max_bytes=1 << 20))
    locators = [Locator("1", "2", sop) for sop in BAD_ANSWERS]
    got = dict(fetch_all(source, locators, connections=4))
    for locator in locators:
        answer, reason = got[locator], BAD_ANSWERS[locator.sop_instance_uid]
        if reason is None:
            assert answer == _Pacs.instance
        else:
            assert isinstance(answer, FetchError), (locator, answer)
            assert answer.reason == reason, (locator, answer)
    source.close()


def test_a_scan_of_a_pacs_that_answers_badly_has_a_failed_row_for_each(
    bad_pacs: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the command: every instance the query listed is a row, each bad answer a
    failed one with its reason, and the run ends well (exit 0)."""
    monkeypatch.setattr(_Pacs, "listed", True)
    out = tmp_path / "reports"
    argv = ["scan", bad_pacs, "--out", str(out), "--workers", "1", "--pacs-timeout", "1"]
    assert main([*argv, "--no-progress"]) == 0
    images = pd.read_parquet(out / "images.parquet").set_index("path")
    assert sorted(images.index) == sorted(f"1/2/{sop}" for sop in BAD_ANSWERS)
    for sop, reason in BAD_ANSWERS.items():
        row = images.loc[f"1/2/{sop}"]
        if reason is None:
            assert row["status"] == "scored"
        elif sop == "1.6":  # within a scan's cap: zeros, no multipart at all
            assert (row["status"], row["reason"]) == ("failed", "fetch_error:bad_multipart")
        else:
            assert (row["status"], row["reason"]) == ("failed", reason), sop


def test_a_pacs_that_stops_answering_stops_the_run(tmp_path: Path) -> None:
    class Silent(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            time.sleep(3)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        source = open_source(url, SourceOptions(connect_timeout=1.0, answer_timeout=1.0))
        with pytest.raises(PacsUnavailableError, match="stopped answering"):
            source.fetch(Locator("1", "2", "3"))
        with pytest.raises(PacsUnavailableError, match="stopped answering"):
            list(source.find(Window()))
    finally:
        server.shutdown()
        server.server_close()


def test_a_multipart_answer_is_read_strictly() -> None:
    body = b"--x\r\nContent-Type: application/dicom\r\n\r\nDATA\r\n--x--\r\n"
    assert single_part(body, 'multipart/related; type="application/dicom"; boundary=x') == b"DATA"
    assert single_part(b"DATA", "application/dicom") == b"DATA"
    with pytest.raises(FetchError, match="bad_multipart"):
        single_part(
            body.replace(b"application/dicom", b"image/jpeg"), "multipart/related; boundary=x"
        )


# -- credentials ---------------------------------------------------------------------------


def secrets_of(credentials: Path) -> list[str]:
    return Credentials.read(credentials).secrets()


@needs_dicomweb
def test_credentials_appear_in_no_message_and_no_log(
    pacs: Any, credentials: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    secrets = secrets_of(credentials)
    assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() in secrets
    texts: list[str] = []
    caplog.set_level(logging.DEBUG)
    logging.getLogger().setLevel(logging.DEBUG)
    source = web_source(pacs, credentials)
    texts += [repr(source.options), repr(Credentials.read(credentials)), source.name]
    for _, got in fetch_all(source, list(source.find(Window()))[:3]):
        assert isinstance(got, bytes)
    with pytest.raises(FetchError) as gone:
        source.fetch(Locator("1.2", "3.4", "5.6"))
    texts.append(str(gone.value))
    source.close()
    wrong = tmp_path / "wrong"
    wrong.write_text(f"{USER}:{PASSWORD}-wrong\n")
    with pytest.raises(PacsUnavailableError) as refused:
        list(open_source(pacs.dicomweb_url, SourceOptions(credentials=wrong)).find(Window()))
    texts.append(str(refused.value))
    assert "refused the credentials" in str(refused.value)
    down = f"http://127.0.0.1:{pacs_job.free_port()}/dicom-web"
    with pytest.raises(PacsUnavailableError) as unreachable:
        list(open_source(down, SourceOptions(credentials=credentials)).find(Window()))
    texts.append(str(unreachable.value))
    for bad in ("", f"{USER}\n", f"{USER}:{PASSWORD}\nsecond:line\n", "Bearer \n"):
        path = tmp_path / "bad"
        path.write_text(bad)
        with pytest.raises(SourceConfigError) as refused_file:
            Credentials.read(path)
        texts.append(str(refused_file.value))
    with pytest.raises(SourceConfigError) as in_url:
        open_source(f"http://{USER}:{PASSWORD}@127.0.0.1:1/dicom-web")
    texts.append(str(in_url.value))
    captured = capsys.readouterr()
    everything = "\n".join([*texts, caplog.text, captured.out, captured.err])
    for secret in [*secrets, f"{PASSWORD}-wrong"]:
        assert secret not in everything


def test_a_bearer_token_goes_in_the_authorization_header(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("Bearer abc.def.ghi\n")
    credentials = Credentials.read(path)
    assert credentials.authorization() == "Bearer abc.def.ghi"
    assert "abc.def" not in repr(credentials)


# -- names ---------------------------------------------------------------------------------


def test_urls_windows_and_locators() -> None:
    assert is_pacs_url("https://pacs.example/dicom-web")
    assert is_pacs_url("dicom://PACS@pacs.example:104")
    assert not is_pacs_url("/mnt/archive")
    assert redact_url("https://u:p@host/dicom-web") == "https://host/dicom-web"
    assert redact_url("dicom://PACS@host:104") == "dicom://PACS@host:104"
    with pytest.raises(SourceConfigError):
        open_source("ftp://host/")
    with pytest.raises(SourceConfigError):
        open_source("dicom://host:104")
    assert Window(date(2026, 1, 2), date(2026, 3, 4)).dicom_range() == "20260102-20260304"
    assert Window(date(2026, 1, 2)).dicom_range() == "20260102-"
    assert Window().dicom_range() == ""
    assert Window.nightly(date(2026, 5, 10), 3).since == date(2026, 5, 7)
    assert Window.nightly(None, 3).since is None
    assert Window.nightly(date(2026, 5, 10), 3, since=date(2020, 1, 1)).since == date(2020, 1, 1)
    with pytest.raises(SourceConfigError):
        Window(date(2026, 2, 1), date(2026, 1, 1))
    locator = Locator("1.2", "3.4", "5.6")
    assert Locator.from_path(locator.path) == locator
    with pytest.raises(ValueError):
        Locator.from_path("../etc/passwd")
