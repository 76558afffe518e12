"""``batchscan send``: the SRs of an outbox to a real PACS (Orthanc on 127.0.0.1), once each,
through a PACS that goes down in the middle, over DICOM TLS, and refused cleanly."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from batchscan.cli import main
from batchscan.pacs.outbox import Outbox, Pending
from batchscan.pacs.send import Destination, DestinationError, SendError, send_outbox
from batchscan.synth import write_demo_archive
from tests.conftest import load_job, nightly

pacs_job = load_job("common/orthanc")
needs_orthanc = pytest.mark.skipif(
    pacs_job.orthanc_missing() is not None,
    reason=f"{pacs_job.orthanc_missing()}; bash tests/debian-tools.sh installs it (as root)",
)


@pytest.fixture
def outbox(demo_srs: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh copy of the demo archive's outbox (6 SRs, nothing delivered yet)."""
    copy = tmp_path / "outbox"
    shutil.copytree(demo_srs["outbox"], copy)
    return copy


def sr_uids(outbox: Path) -> list[str]:
    return sorted(pydicom.dcmread(p).SOPInstanceUID for p in outbox.glob("*/*.dcm"))


def send(*args: str) -> int:
    try:
        return main(["send", *args])
    except SystemExit as exc:  # argparse's refusals
        return int(exc.code or 0)


@pytest.fixture
def pacs(tmp_path: Path) -> Any:
    server = pacs_job.Orthanc(tmp_path / "orthanc")
    server.start()
    yield server
    server.stop()


@needs_orthanc
def test_every_sr_reaches_the_pacs_once_and_then_nothing_is_sent(
    outbox: Path, pacs: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert send(str(outbox), "--to", pacs.destination) == 0
    assert "sent 6 SRs" in capsys.readouterr().out
    assert pacs.sop_instance_uids() == sr_uids(outbox)
    # filed into the original studies, with the patient's identity
    studies = {pacs.get(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"] for s in
               pacs.get("/studies")}  # fmt: skip
    assert studies == {p.parent.name for p in outbox.glob("*/*.dcm")}
    with Outbox(outbox) as ledger:
        assert ledger.count("deliveries") == 6
    pacs.stop()  # nothing is left: the next send must not even connect
    assert send(str(outbox), "--to", pacs.destination) == 0
    assert "sent 0 SRs" in capsys.readouterr().out


@needs_orthanc
def test_a_pacs_down_in_the_middle_gets_the_rest_from_the_next_send_none_twice(
    outbox: Path, tmp_path: Path
) -> None:
    server = pacs_job.Orthanc(tmp_path / "orthanc")
    server.start()
    destination = Destination.parse(server.destination)
    acknowledged: list[str] = []

    def stop_after_two(item: Pending) -> None:
        acknowledged.append(item.sop_instance_uid)
        if len(acknowledged) == 2:
            server.stop(kill=True)  # gone in the middle of the association

    try:
        with pytest.raises(SendError, match=r"TESTPACS@127\.0\.0\.1:\d+ .*4 SRs left to send"):
            send_outbox(outbox, destination, on_stored=stop_after_two, answer_timeout=10)
        with Outbox(outbox) as ledger:
            assert ledger.count("deliveries") == 2
            assert len(ledger.undelivered(str(destination))) == 4
        # still down: exit 1, naming the PACS and the count left, nothing recorded
        with pytest.raises(SendError, match=r"cannot be reached .*; 4 SRs left"):
            send_outbox(outbox, destination, connect_timeout=3)
        server.start()
        second: list[str] = []
        outcome = send_outbox(
            outbox, destination, on_stored=lambda i: second.append(i.sop_instance_uid)
        )
        assert (outcome.sent, outcome.left) == (4, 0)
        assert not set(acknowledged) & set(second), "no SR is sent twice"
        assert sorted(acknowledged + second) == sr_uids(outbox)
        assert server.sop_instance_uids() == sr_uids(outbox)
    finally:
        server.stop()


@needs_orthanc
def test_a_broken_sr_file_holds_back_no_other(
    outbox: Path, pacs: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = sorted(outbox.glob("*/*.dcm"))[0]
    broken.write_bytes(broken.read_bytes()[:200])  # truncated on disk after it was written
    assert send(str(outbox), "--to", pacs.destination) == 1
    err = capsys.readouterr().err
    assert "sent 5, 1 missing or unreadable in the outbox folder; 1 SRs left to send" in err
    assert len(pacs.sop_instance_uids()) == 5


@needs_orthanc
def test_a_pacs_that_refuses_the_association_exits_1_and_marks_nothing(
    outbox: Path, pacs: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    port = pacs.destination.rsplit(":", 1)[1]
    wrong = f"NOTTHEPACS@127.0.0.1:{port}"  # Orthanc checks the called AE title
    assert send(str(outbox), "--to", wrong) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"batchscan: error: PACS {wrong} rejected the association; 6 SRs left to send"
    with Outbox(outbox) as ledger:
        assert ledger.count("deliveries") == 0
    assert pacs.get("/instances") == []


@needs_orthanc
def test_dicom_tls_with_a_client_certificate(outbox: Path, tmp_path: Path) -> None:
    pki = pacs_job.make_pki(tmp_path / "pki")
    with pacs_job.Orthanc(tmp_path / "orthanc", tls=pki) as server:
        # plain DICOM to a TLS port, and TLS without the client certificate: refused, nothing sent
        assert send(str(outbox), "--to", server.destination) == 1
        assert send(str(outbox), "--to", server.destination, "--tls-ca", str(pki.ca)) == 1
        assert server.get("/instances") == []
        code = send(
            str(outbox), "--to", server.destination, "--tls-ca", str(pki.ca),
            "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key),
        )  # fmt: skip
        assert code == 0
        assert server.sop_instance_uids() == sr_uids(outbox)


@needs_orthanc
def test_send_reads_its_config_like_scan(
    outbox: Path, pacs: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "batchscan.toml"
    config.write_text(
        f'sr_out = "{outbox}"\nsend_to = "{pacs.destination}"\ncalling_aet = "NIGHTLY"\n'
    )
    assert send("--config", str(config)) == 0
    assert "sent 6 SRs" in capsys.readouterr().out


def test_nothing_to_send_exits_0_without_connecting(outbox: Path) -> None:
    with socket.socket() as sock:  # a port on which nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = f"PACS@127.0.0.1:{port}"
    with Outbox(outbox) as ledger:
        for item in ledger.undelivered(target):
            ledger.delivered(item.sop_instance_uid, target)
    assert send(str(outbox), "--to", target) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "PACS@host"], "--to must be AET@HOST:PORT"),
        (["--to", "PACS@host:0"], "port must be 1-65535"),
        (["--to", "A_TITLE_LONGER_THAN_16@host:104"], "an AE title is 1-16"),
        (["--to", "PACS@host:104", "--calling-aet", "BAD\\AET"], "--calling-aet"),
        (["--to", "PACS@host:104", "--tls-cert", "c.pem"], "--tls-cert and --tls-key go"),
        (["--to", "PACS@host:104", "--tls-ca", "/no/such/ca.pem"], "TLS files cannot be used"),
        (["--to", "PACS@host:104", "--port"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    outbox: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert send(str(outbox), *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_folder_that_is_no_outbox_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert send(str(tmp_path), "--to", "PACS@127.0.0.1:104") == 2
    assert "is no SR outbox" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "nothing made in a folder that is no outbox"


def test_destinations_are_parsed_as_written() -> None:
    assert str(Destination.parse("PACS@[::1]:11112")) == "PACS@[::1]:11112"
    assert Destination.parse("MY PACS@pacs.example.org:104").host == "pacs.example.org"
    with pytest.raises(DestinationError):
        Destination.parse("@host:104")


@needs_orthanc
def test_the_nightly_wrapper_scans_then_sends(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_demo_archive(archive, size=256)
    server = pacs_job.Orthanc(tmp_path / "orthanc")
    config = tmp_path / "batchscan.toml"
    config.write_text(
        f'archive = "{archive}"\nout = "reports"\nsr_out = "outbox"\nworkers = 1\n'
        f'send_to = "{server.destination}"\n'
    )
    down = nightly(config, tmp_path / "logs")  # the PACS is down: the scan is done, the SRs wait
    assert down.returncode == 1
    assert "sending SRs to the PACS failed" in down.stdout
    assert "6 SRs left to send" in down.stdout
    assert len(list((tmp_path / "outbox").glob("*/*.dcm"))) == 6
    with server:
        time.sleep(1.1)  # a new log name per second
        up = nightly(config, tmp_path / "logs")
        assert (up.returncode, up.stdout) == (0, "")
        assert server.sop_instance_uids() == sr_uids(tmp_path / "outbox")
