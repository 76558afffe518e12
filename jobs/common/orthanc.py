#!/usr/bin/env python3
"""A real PACS on this machine's loopback: Orthanc (Debian package ``orthanc``) with a
configuration written here, for tests/test_send.py, tests/test_pacs_source.py,
jobs/bench/sr_benchmark.py and jobs/bench/pacs_benchmark.py.

Usage (a PACS to try ``batchscan send`` or a PACS scan against by hand; Ctrl-C stops it):
    python jobs/common/orthanc.py [--folder DIR] [--tls] [--dicomweb] [--https] [--user U:P]

The configuration is the smallest that serves: no plugins unless asked (the Debian
package's default configuration loads some), the HTTP API on 127.0.0.1 only with remote
access off, storage and index in a folder of the caller's, DICOM on a free port with the
called AE title checked, and, with ``tls``, DICOM TLS with a certificate authority, server
and client certificates made here with the ``openssl`` command (the client certificate
required). With ``dicomweb`` the DICOMweb plugin (Debian ``orthanc-dicomweb``) serves
QIDO-RS, WADO-RS and STOW-RS under ``/dicom-web``; ``users`` turns on HTTP basic
authentication, ``https`` serves HTTP over TLS with the test's own certificates, and
``reader_aet`` is an AE title allowed to C-FIND and C-GET (the rights a site gives
batchscan's AE). Every request this module makes goes to 127.0.0.1.

HTTPS is terminated in front of Orthanc by a small TLS proxy of this module
(:class:`TlsProxy`), as sites often put a reverse proxy in front of their PACS: Debian's
Orthanc 1.10.1 ends with a segmentation fault on the first TLS connection to its own HTTPS
server (``SslEnabled``; civetweb against OpenSSL 3), so that cannot serve a test.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
AE_TITLE = "TESTPACS"
#: How Orthanc's verbose log says it sent an instance: a WADO-RS retrieve (the plugin reads
#: the file) or a C-GET sub-operation.
_SENT = re.compile(
    r"REST GET call on URI /instances/([0-9a-f-]+)/file|C-GET: Sending resource ([0-9a-f-]+)"
)
#: The DICOMweb plugin of Debian's ``orthanc-dicomweb``.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_missing() -> str | None:
    """Why Orthanc cannot be started here, or None."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (Debian: apt-get install orthanc)"
    return None


def dicomweb_missing() -> str | None:
    """Why Orthanc with its DICOMweb plugin cannot be started here, or None."""
    if problem := orthanc_missing():
        return problem
    if not DICOMWEB_PLUGIN.is_file():
        return "Orthanc's DICOMweb plugin is missing (Debian: apt-get install orthanc-dicomweb)"
    return None


def dicom_files(folder: Path) -> list[Path]:
    """The files of a folder that are DICOM with a data set (what a PACS takes), in order."""
    import pydicom

    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        found.append(path)
    return found


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


class TlsProxy:
    """HTTPS on a free loopback port, forwarded as plain HTTP to `upstream_port`: a TLS
    terminating reverse proxy with the server certificate of `tls`.

    One thread accepts, two threads per connection copy bytes each way; when the upstream
    is down the client's connection is closed at once (as a proxy in front of a stopped
    PACS does).
    """

    def __init__(self, tls: TlsFiles, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(tls.server_cert), str(tls.server_key))
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = int(self._listener.getsockname()[1])
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self._context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        try:
            upstream = socket.create_connection((LOOPBACK, self.upstream_port), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._open |= {client, upstream}
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
            self._open.discard(end)

    def close(self) -> None:
        """Stop accepting and cut every open connection."""
        self._listener.close()
        for end in list(self._open):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


class Orthanc:
    """One Orthanc server, started and stopped by its owner (storage kept across restarts).

    Parameters
    ----------
    folder:
        Where its configuration, storage, index and log go.
    tls:
        DICOM TLS with these files (the client certificate required), or plain DICOM.
    dicomweb:
        Load the DICOMweb plugin (QIDO-RS, WADO-RS, STOW-RS under ``/dicom-web``).
    users:
        HTTP basic authentication with these users and passwords (None: none).
    https:
        Serve HTTP over TLS with the server certificate of these files.
    reader_aet:
        An AE title (on 127.0.0.1) allowed to C-FIND and C-GET, as a site registers
        batchscan's AE; any other calling AE may only store and echo.
    verbose:
        Log every request (Orthanc's ``--verbose``), so that :meth:`fetches` can count the
        instances it sent.
    """

    def __init__(
        self,
        folder: Path,
        tls: TlsFiles | None = None,
        *,
        dicomweb: bool = False,
        users: dict[str, str] | None = None,
        https: TlsFiles | None = None,
        reader_aet: str | None = None,
        verbose: bool = False,
    ) -> None:
        self.folder = folder
        self.verbose = verbose
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.tls = tls
        self.https = https
        self.users = dict(users or {})
        self._process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "batchscan-test-pacs",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomServerEnabled": True,
            "DicomAet": AE_TITLE,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {},
            "StableAge": 1,
        }
        if dicomweb:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}
        if reader_aet is not None:
            config["DicomModalities"] = {
                "batchscan": {"AET": reader_aet, "Host": LOOPBACK, "Port": 104,
                              "AllowFind": True, "AllowGet": True, "AllowMove": False,
                              "AllowStore": True, "AllowEcho": True}
            }  # fmt: skip
        self._proxy: TlsProxy | None = None
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

    @property
    def http_url(self) -> str:
        """The base of its HTTP API (``https``, through the TLS proxy, when it serves TLS)."""
        if self.https is None:
            return f"http://{LOOPBACK}:{self.http_port}"
        if self._proxy is None:
            self._proxy = TlsProxy(self.https, self.http_port)
        return f"https://{LOOPBACK}:{self._proxy.port}"

    @property
    def dicomweb_url(self) -> str:
        """Its DICOMweb base, as ``batchscan scan URL`` and ``send --stow`` name it."""
        return f"{self.http_url}/dicom-web"

    @property
    def dimse_url(self) -> str:
        """Its DIMSE peer, as ``batchscan scan dicom://AET@HOST:PORT`` names it."""
        return f"dicom://{AE_TITLE}@{LOOPBACK}:{self.dicom_port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start it and wait until its HTTP API and DICOM port answer."""
        log = (self.folder / "orthanc.log").open("ab")
        self._process = subprocess.Popen(
            ["Orthanc", *(["--verbose"] if self.verbose else []), str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
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
        """Stop it (SIGKILL with `kill`: a PACS that goes away mid-association); the TLS
        proxy stays, as a site's would, so that a restart serves the same URL."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _request(self, path: str, data: bytes | None = None, method: str = "GET") -> bytes:
        """One request to its REST API on the loopback, as its first user when it has users,
        trusting the test's CA when it serves HTTPS."""
        request = urllib.request.Request(f"{self.http_url}{path}", data=data, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        context = None
        if self.https is not None:
            context = ssl.create_default_context(cafile=str(self.https.ca))
        with urllib.request.urlopen(request, timeout=30, context=context) as answer:
            return answer.read()

    def get(self, path: str) -> Any:
        """A GET of its REST API on the loopback, as JSON."""
        return json.loads(self._request(path))

    def upload(self, files: list[Path]) -> list[str]:
        """Store DICOM files in it (its REST API; a PACS's own import, not batchscan's), and
        return their Orthanc ids."""
        return [json.loads(self._request("/instances", f.read_bytes(), "POST"))["ID"]
                for f in files]  # fmt: skip

    def delete(self, orthanc_id: str) -> None:
        """Remove one instance (an instance gone from the PACS)."""
        self._request(f"/instances/{orthanc_id}", method="DELETE")

    def fetches(self) -> list[str]:
        """The Orthanc ids of the instances it has sent, once per sending, since its folder
        was made (WADO-RS retrieves and C-GET sub-operations, read from its log; only with
        `verbose`)."""
        log = (self.folder / "orthanc.log").read_text(errors="replace")
        return [a or b for a, b in _SENT.findall(log)]

    def stored(self) -> int:
        """How many instances it stores now."""
        return int(self.get("/statistics")["CountInstances"])

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
        if self._proxy is not None:
            self._proxy.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=Path("orthanc-pacs"))
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--dicomweb", action="store_true", help="load the DICOMweb plugin")
    parser.add_argument("--https", action="store_true", help="serve HTTP over TLS")
    parser.add_argument("--user", help="USER:PASSWORD for HTTP basic authentication")
    parser.add_argument("--reader-aet", default="BATCHSCAN", help="AE allowed C-FIND/C-GET")
    args = parser.parse_args()
    if problem := (dicomweb_missing() if args.dicomweb else orthanc_missing()):
        raise SystemExit(problem)
    pki = make_pki(args.folder / "pki") if args.tls or args.https else None
    users = dict([args.user.split(":", 1)]) if args.user else None
    with Orthanc(
        args.folder,
        pki if args.tls else None,
        dicomweb=args.dicomweb,
        users=users,
        https=pki if args.https else None,
        reader_aet=args.reader_aet,
    ) as pacs:
        hint = f"batchscan send OUTBOX --to {pacs.destination}"
        if args.tls and pki is not None:
            hint += f" --tls-ca {pki.ca} --tls-cert {pki.client_cert} --tls-key {pki.client_key}"
        print(f"Orthanc on {pacs.destination}, REST on {pacs.http_url}")
        if args.dicomweb:
            print(f"DICOMweb on {pacs.dicomweb_url}")
        print(hint)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
