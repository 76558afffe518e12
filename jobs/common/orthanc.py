#!/usr/bin/env python3
"""A real PACS on this machine's loopback: Orthanc (Debian package ``orthanc``) with a
configuration written here, for tests/test_send.py and jobs/bench/sr_benchmark.py.

Usage (a PACS to try ``batchscan send`` against by hand; Ctrl-C stops it):
    python jobs/common/orthanc.py [--folder DIR] [--tls]

The configuration is the smallest that serves: no plugins (the Debian package's default
configuration loads some), the HTTP API on 127.0.0.1 only with remote access off, storage
and index in a folder of the caller's, DICOM on a free port with the called AE title
checked, and, with ``tls``, DICOM TLS with a certificate authority, server and client
certificates made here with the ``openssl`` command (the client certificate required).
Every request this module makes goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
AE_TITLE = "TESTPACS"


def orthanc_missing() -> str | None:
    """Why Orthanc cannot be started here, or None."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (Debian: apt-get install orthanc)"
    return None


def free_port() -> int:
    """A TCP port free on the loopback now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of a small PKI: a CA, the PACS's certificate and batchscan's."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(folder: Path, host: str = LOOPBACK) -> TlsFiles:
    """A CA and two certificates it signs (the server's for `host`), with ``openssl``."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
        "ca.pem", "-days", "2", "-subj", "/CN=batchscan test CA")  # fmt: skip
    for name, san in (("server", f"IP:{host}"), ("client", "DNS:batchscan")):
        (folder / f"{name}.ext").write_text(
            f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n", encoding="utf-8"
        )
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
            f"{name}.ext")  # fmt: skip
    return TlsFiles(
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server.key",
        folder / "client.pem",
        folder / "client.key",
    )


class Orthanc:
    """One Orthanc server, started and stopped by its owner (storage kept across restarts).

    Parameters
    ----------
    folder:
        Where its configuration, storage, index and log go.
    tls:
        DICOM TLS with these files (the client certificate required), or plain DICOM.
    """

    def __init__(self, folder: Path, tls: TlsFiles | None = None) -> None:
        self.folder = folder
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.tls = tls
        self._process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "batchscan-test-pacs",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": AE_TITLE,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {},
            "StableAge": 1,
        }
        if tls is not None:
            config.update(
                DicomTlsEnabled=True,
                DicomTlsCertificate=str(tls.server_cert),
                DicomTlsPrivateKey=str(tls.server_key),
                DicomTlsTrustedCertificates=str(tls.ca),
                DicomTlsRemoteCertificateRequired=True,
            )
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2), encoding="utf-8")

    @property
    def destination(self) -> str:
        """Its Storage SCP as ``batchscan send --to`` names it."""
        return f"{AE_TITLE}@{LOOPBACK}:{self.dicom_port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start it and wait until its HTTP API and DICOM port answer."""
        log = (self.folder / "orthanc.log").open("ab")
        self._process = subprocess.Popen(
            ["Orthanc", str(self.config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = (self.folder / "orthanc.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Orthanc exited at start:\n{tail}")
            with contextlib.suppress(OSError):
                self.get("/system")
                with socket.create_connection((LOOPBACK, self.dicom_port), timeout=1):
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not start in time")

    def stop(self, kill: bool = False) -> None:
        """Stop it (SIGKILL with `kill`: a PACS that goes away mid-association)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def get(self, path: str) -> Any:
        """A GET of its REST API on the loopback, as JSON."""
        url = f"http://{LOOPBACK}:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return json.loads(answer.read())

    def sop_instance_uids(self) -> list[str]:
        """The SOP Instance UIDs of every instance it stores."""
        return sorted(
            self.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
            for i in self.get("/instances")
        )

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=Path("orthanc-pacs"))
    parser.add_argument("--tls", action="store_true")
    args = parser.parse_args()
    if problem := orthanc_missing():
        raise SystemExit(problem)
    tls = make_pki(args.folder / "pki") if args.tls else None
    with Orthanc(args.folder, tls) as pacs:
        hint = f"batchscan send OUTBOX --to {pacs.destination}"
        if tls is not None:
            hint += f" --tls-ca {tls.ca} --tls-cert {tls.client_cert} --tls-key {tls.client_key}"
        print(f"Orthanc on {pacs.destination}, REST on http://{LOOPBACK}:{pacs.http_port}")
        print(hint)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
