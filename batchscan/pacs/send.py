"""``batchscan send OUTBOX --to AET@HOST:PORT``: C-STORE the SRs a PACS has not acknowledged.

Why a separate command rather than a step of the scan: the PACS is another system, with
its own maintenance windows. A scan never waits for it or fails because of it; the SRs
wait in the outbox, and ``send`` (after the scan in the nightly cron wrapper, or on its own)
delivers what is left, as often as it is run:

* what is sent is what the ledger (:mod:`batchscan.pacs.outbox`) has no delivery of for
  this destination, oldest first; nothing left: exit 0 without connecting;
* a delivery is recorded, and committed, after the PACS acknowledged the C-STORE (success
  or a warning status: it stored the SR) and before the next SR is sent, so a send killed or
  cut off at any point sends each SR at most once more, and never records one the PACS did
  not acknowledge;
* the PACS refusing the association, going away, answering "out of resources", or not
  answering within the timeout stops the send (:class:`SendError`, exit 1, naming the PACS
  and what is left); an SR the PACS refuses on its own merits (a failure status other than
  out of resources) is left undelivered and the others are still sent, so that one SR can
  never hold back the rest;
* DICOM TLS (PS3.15 B.1, the TLS secure transport connection profile) with a CA file and
  optionally a client certificate, because hospital networks increasingly require it; the
  PACS's certificate and host name are checked.

pynetdicom's own log is silenced: at debug level it prints datasets, and an SR holds the
patient's identity. Messages name SRs by UID and the PACS by its address only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import ComprehensiveSRStorage  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from batchscan import __version__
from batchscan.ingest.records import INTERPRETER_EXITS
from batchscan.pacs.outbox import Outbox, Pending

#: batchscan's own AE title when ``--calling-aet`` is not given.
DEFAULT_CALLING_AET: Final = "BATCHSCAN"
#: Seconds to wait for the PACS to accept the connection, and for each answer.
CONNECT_TIMEOUT: Final = 30.0
ANSWER_TIMEOUT: Final = 120.0

_AET: Final = re.compile(r"[ -\[\]-~]{1,16}")  # printable ASCII without backslash


class SendError(RuntimeError):
    """The send stopped, or ended with SRs undelivered (exit 1)."""


class DestinationError(ValueError):
    """A bad ``--to``, ``--calling-aet`` or TLS option (exit 2)."""


@dataclass(frozen=True, slots=True)
class Destination:
    """A PACS's Storage SCP: its AE title and network address."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Read ``AET@HOST:PORT`` (an IPv6 address in brackets: ``AET@[::1]:104``).

        Raises
        ------
        DestinationError
            The text is not of that form, or the AE title or port is not valid.
        """
        match = re.fullmatch(r"(.+)@(\[[0-9A-Fa-f:.]+\]|[^@:\[\]\s]+):(\d{1,5})", text)
        if match is None:
            raise DestinationError(f"--to must be AET@HOST:PORT, got {text!r}")
        ae_title, host, port = match.group(1), match.group(2).strip("[]"), int(match.group(3))
        check_ae_title(ae_title, "--to")
        if not 1 <= port <= 65535:
            raise DestinationError(f"--to port must be 1-65535, got {port}")
        return cls(ae_title, host, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def check_ae_title(ae_title: str, option: str) -> str:
    """An AE title as PS3.5 allows it: 1-16 printable ASCII characters, no backslash, not
    only spaces.

    Raises
    ------
    DestinationError
        It is not.
    """
    if not _AET.fullmatch(ae_title) or not ae_title.strip():
        raise DestinationError(
            f"{option}: an AE title is 1-16 printable ASCII characters without a "
            f"backslash, got {ae_title!r}"
        )
    return ae_title


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """DICOM TLS: the CA that signed the PACS's certificate (None: the system's CAs), and
    batchscan's own certificate and key when the PACS asks for one."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def context(self) -> ssl.SSLContext:
        """The client TLS context (certificate and host name checked, TLS 1.2 or later).

        Raises
        ------
        DestinationError
            A file is missing or not a certificate or key, or only one of cert and key is
            given.
        """
        if (self.cert is None) != (self.key is None):
            raise DestinationError("--tls-cert and --tls-key go together")
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=None if self.ca is None else str(self.ca)
            )
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert is not None and self.key is not None:
                context.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as exc:
            raise DestinationError(f"TLS files cannot be used: {exc}") from exc
        return context


@dataclass(slots=True)
class SendOutcome:
    """What one send did."""

    destination: Destination
    due: int = 0  # SRs undelivered to it when the send began
    sent: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # SR UID -> status
    missing: list[str] = field(default_factory=list)  # SR UIDs whose file is gone or broken

    @property
    def left(self) -> int:
        """SRs still undelivered to the destination."""
        return self.due - self.sent

    def summary(self) -> str:
        """The closing line."""
        return f"sent {self.sent} SRs to {self.destination}; {self.left} left to send."


def _quiet_pynetdicom() -> None:
    logger = logging.getLogger("pynetdicom")
    logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False


def _no_delay(event: evt.Event) -> None:
    """Send each PDU at once (TCP_NODELAY): a C-STORE is a command PDU then a data PDU,
    and with Nagle's algorithm the second waits for the PACS's delayed ACK of the first,
    40 ms an SR on Linux (measured with Orthanc on loopback: 96 ms an SR without, 54 with)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_outbox(
    outbox_dir: Path,
    destination: Destination,
    calling_aet: str = DEFAULT_CALLING_AET,
    tls: TlsOptions | None = None,
    on_stored: Callable[[Pending], None] | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    answer_timeout: float = ANSWER_TIMEOUT,
) -> SendOutcome:
    """Send every SR of the outbox that `destination` has not acknowledged.

    Parameters
    ----------
    on_stored:
        Called after each acknowledged SR is recorded (progress; tests stop the PACS here).

    Raises
    ------
    batchscan.pacs.outbox.OutboxError
        `outbox_dir` is no outbox (exit 2).
    DestinationError
        A bad AE title or TLS option (exit 2).
    SendError
        The PACS could not be reached, refused, or went away, or SRs are left undelivered
        (exit 1); what was acknowledged before is recorded.
    """
    check_ae_title(calling_aet, "--calling-aet")
    context = tls.context() if tls is not None else None
    target = str(destination)
    with Outbox(outbox_dir) as outbox:
        pending = outbox.undelivered(target)
        outcome = SendOutcome(destination, due=len(pending))
        if not pending:
            return outcome
        _quiet_pynetdicom()
        ae = AE(ae_title=calling_aet)
        ae.add_requested_context(
            ComprehensiveSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        ae.connection_timeout = connect_timeout
        ae.acse_timeout = answer_timeout
        ae.dimse_timeout = answer_timeout
        ae.network_timeout = answer_timeout
        ae.implementation_version_name = f"BATCHSCAN_{__version__}"[:16]
        tls_args = None if context is None else (context, destination.host)
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)],
        )
        if not assoc.is_established:
            why = (
                "rejected the association"
                if assoc.is_rejected
                else "cannot be reached (down, another port, or a TLS mismatch)"
            )
            raise SendError(f"PACS {target} {why}; {len(pending)} SRs left to send")
        try:
            if not assoc.accepted_contexts:
                raise SendError(
                    f"PACS {target} does not accept Comprehensive SR Storage; "
                    f"{len(pending)} SRs left to send"
                )
            _store_all(assoc, outbox, pending, target, outcome, on_stored)
        finally:
            if assoc.is_established:
                assoc.release()
    if outcome.missing or outcome.refused:
        parts = []
        if outcome.refused:
            statuses = sorted({f"0x{s:04X}" for s in outcome.refused.values()})
            parts.append(f"{len(outcome.refused)} refused (status {', '.join(statuses)})")
        if outcome.missing:
            parts.append(f"{len(outcome.missing)} missing or unreadable in the outbox folder")
        raise SendError(
            f"PACS {target}: sent {outcome.sent}, {'; '.join(parts)}; "
            f"{outcome.left} SRs left to send"
        )
    return outcome


def _read_sr(item: Pending) -> Dataset | None:
    """The SR file of a ledger row, or None when it is missing, unreadable or not the bytes
    that were written (the ledger holds their SHA-256: pydicom reads a truncated file as far
    as it goes, and a PACS would store the half)."""
    try:
        data = item.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != item.sha256:
            return None
        dataset = pydicom.dcmread(io.BytesIO(data))
    except INTERPRETER_EXITS:
        raise
    except Exception:
        return None
    return dataset


def _store_all(
    assoc: Association,
    outbox: Outbox,
    pending: list[Pending],
    target: str,
    outcome: SendOutcome,
    on_stored: Callable[[Pending], None] | None,
) -> None:
    """C-STORE each pending SR on the open association, recording each acknowledgement."""
    for number, item in enumerate(pending, start=1):
        dataset = _read_sr(item)
        if dataset is None:  # gone, or no longer the SR the ledger names: sent by no one
            outcome.missing.append(item.sop_instance_uid)
            continue
        status = None
        if assoc.is_established:
            try:
                status = assoc.send_c_store(dataset, msg_id=number % 65536 or 1)
            except RuntimeError:  # pynetdicom noticed that the association is gone
                status = None
        code = status.get("Status") if status is not None else None
        if code is None:  # no answer: the connection was lost or timed out
            raise SendError(
                f"PACS {target} stopped answering after {outcome.sent} SRs; "
                f"{outcome.left} SRs left to send"
            )
        # success, or a warning with which the PACS still stored the SR (PS3.4 B.2.3:
        # coercion of data elements, elements discarded, not matching the SOP class)
        if code_to_category(int(code)) in ("Success", "Warning"):
            outbox.delivered(item.sop_instance_uid, target)
            outcome.sent += 1
            if on_stored is not None:
                on_stored(item)
        elif 0xA700 <= int(code) <= 0xA7FF:
            raise SendError(
                f"PACS {target} is out of resources (status 0x{int(code):04X}) after "
                f"{outcome.sent} SRs; {outcome.left} SRs left to send"
            )
        else:
            outcome.refused[item.sop_instance_uid] = int(code)
