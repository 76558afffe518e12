"""``batchscan send OUTBOX --to AET@HOST:PORT`` (C-STORE) or ``--stow URL`` (STOW-RS): deliver
the SRs a PACS has not acknowledged.

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

STOW-RS (:func:`send_stow`, DICOMweb) keeps the same ledger and the same rules: one SR per
request, recorded once the PACS's answer names it among the stored instances (its
Referenced SOP Sequence, or a plain 200, which means every instance was stored); one the
answer names in its Failed SOP Sequence is refused on its own merits, and a PACS that
cannot be reached, refuses the credentials or answers 5xx stops the send. The credentials
come from ``--pacs-credentials FILE``, as for a scan of a DICOMweb PACS, and HTTPS checks
the PACS's certificate against ``--tls-ca``.

pynetdicom's own log is silenced: at debug level it prints datasets, and an SR holds the
patient's identity. Messages name SRs by UID and the PACS by its address only, never with
credentials.
"""

from __future__ import annotations

import hashlib
import io
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pydicom
import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import ComprehensiveSRStorage  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from batchscan import __version__
from batchscan.ingest.records import INTERPRETER_EXITS
from batchscan.ingest.sources import DEFAULT_CALLING_AET, SourceConfigError, SourceOptions
from batchscan.ingest.sources.credentials import Credentials
from batchscan.ingest.sources.dicomweb import check_url, dicomweb_client, http_session
from batchscan.ingest.sources.dimse import (
    Peer,
    check_ae_title,
    client_tls_context,
    no_delay,
    quiet_pynetdicom,
    user_identity,
)
from batchscan.pacs.outbox import Outbox, Pending

#: Seconds to wait for the PACS to accept the connection, and for each answer.
CONNECT_TIMEOUT: Final = 30.0
ANSWER_TIMEOUT: Final = 120.0

#: A bad ``--to``, ``--stow``, ``--calling-aet``, credentials or TLS option (exit 2): the
#: same error as a bad PACS for a scan, whose parsing and TLS set-up send shares.
DestinationError = SourceConfigError


class SendError(RuntimeError):
    """The send stopped, or ended with SRs undelivered (exit 1)."""


class Destination(Peer):
    """A PACS's Storage SCP: its AE title and network address (``AET@HOST:PORT``)."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str, option: str = "--to") -> Destination:
        """Read ``AET@HOST:PORT`` (see :meth:`batchscan.ingest.sources.dimse.Peer.parse`)."""
        peer = Peer.parse(text, option)
        return cls(peer.ae_title, peer.host, peer.port)


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """DICOM TLS or HTTPS: the CA that signed the PACS's certificate (None: the system's
    CAs), and batchscan's own certificate and key when the PACS asks for one."""

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
        return client_tls_context(self.ca, self.cert, self.key)


@dataclass(slots=True)
class SendOutcome:
    """What one send did."""

    destination: Destination | str  # a DIMSE peer, or a DICOMweb base (STOW-RS)
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


def send_outbox(
    outbox_dir: Path,
    destination: Destination,
    calling_aet: str = DEFAULT_CALLING_AET,
    tls: TlsOptions | None = None,
    on_stored: Callable[[Pending], None] | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    answer_timeout: float = ANSWER_TIMEOUT,
    credentials: Path | None = None,
) -> SendOutcome:
    """Send every SR of the outbox that `destination` has not acknowledged.

    Parameters
    ----------
    credentials:
        ``--pacs-credentials FILE``: sent as DICOM user identity (a user and password, or
        a JSON Web Token) when the PACS asks for one; None: none.
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
    identity = user_identity(Credentials.from_file(credentials))
    target = str(destination)
    with Outbox(outbox_dir) as outbox:
        pending = outbox.undelivered(target)
        outcome = SendOutcome(destination, due=len(pending))
        if not pending:
            return outcome
        quiet_pynetdicom()
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
            ext_neg=identity or None,
            evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)],
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
    _raise_if_left(outcome, target)
    return outcome


def _raise_if_left(outcome: SendOutcome, target: str) -> None:
    """:class:`SendError` naming what was refused or missing, when anything was."""
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


def _stow_answer(answer: Dataset, sop_instance_uid: str) -> int | None:
    """What a STOW-RS answer says of one SR: None when the Referenced SOP Sequence names
    it (stored), the failure reason when the Failed SOP Sequence does, 0 when neither."""
    for item in answer.get("FailedSOPSequence", []) or []:
        if item.get("ReferencedSOPInstanceUID") == sop_instance_uid:
            return int(item.get("FailureReason", 0x0110) or 0x0110)
    for item in answer.get("ReferencedSOPSequence", []) or []:
        if item.get("ReferencedSOPInstanceUID") == sop_instance_uid:
            return None
    return 0


def send_stow(
    outbox_dir: Path,
    url: str,
    credentials: Path | None = None,
    tls: TlsOptions | None = None,
    on_stored: Callable[[Pending], None] | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    answer_timeout: float = ANSWER_TIMEOUT,
) -> SendOutcome:
    """Send every SR of the outbox that the DICOMweb PACS at `url` has not acknowledged,
    by STOW-RS, one SR a request (see the module's docstring).

    Parameters
    ----------
    url:
        The PACS's DICOMweb base (``https://pacs.example/dicom-web``); the ledger names the
        destination by it.
    credentials:
        ``--pacs-credentials FILE`` (``user:password`` or ``Bearer TOKEN``), or None.
    on_stored:
        Called after each acknowledged SR is recorded.

    Raises
    ------
    batchscan.pacs.outbox.OutboxError
        `outbox_dir` is no outbox (exit 2).
    DestinationError
        A bad URL, credentials file or TLS option (exit 2).
    SendError
        The PACS could not be reached, refused the credentials, or answered 5xx, or SRs
        are left undelivered (exit 1); what was acknowledged before is recorded.
    """
    target = check_url(url)
    tls = tls or TlsOptions()
    options = SourceOptions(
        credentials=credentials, ca=tls.ca, cert=tls.cert, key=tls.key,
        connect_timeout=connect_timeout, answer_timeout=answer_timeout,
    )  # fmt: skip
    session = http_session(options, Credentials.from_file(credentials))
    with Outbox(outbox_dir) as outbox, session:
        pending = outbox.undelivered(target)
        outcome = SendOutcome(target, due=len(pending))
        client = dicomweb_client(target, session, options)
        for item in pending:
            dataset = _read_sr(item)
            if dataset is None:
                outcome.missing.append(item.sop_instance_uid)
                continue
            try:
                answer = client.store_instances([dataset])
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if status == 409 and exc.response is not None:  # every instance refused
                    try:
                        answer = Dataset.from_json(exc.response.json())
                    except ValueError:
                        answer = Dataset()
                    code = _stow_answer(answer, item.sop_instance_uid)
                    outcome.refused[item.sop_instance_uid] = code or 0xC000
                    continue
                why = {401: "refused the credentials", 403: "does not let these credentials store"}
                raise SendError(
                    f"PACS {target} {why.get(status, f'answered HTTP {status}')} after "
                    f"{outcome.sent} SRs; {outcome.left} SRs left to send"
                ) from None
            except (requests.RequestException, OSError, ValueError) as exc:
                what = "stopped answering" if isinstance(exc, requests.Timeout) else (
                    "failed the TLS check" if isinstance(exc, requests.exceptions.SSLError)
                    else "cannot be reached")  # fmt: skip
                raise SendError(
                    f"PACS {target} {what} after {outcome.sent} SRs; "
                    f"{outcome.left} SRs left to send"
                ) from None
            code = _stow_answer(answer, item.sop_instance_uid)
            if code is None or (code == 0 and "FailedSOPSequence" not in answer):
                outbox.delivered(item.sop_instance_uid, target)
                outcome.sent += 1
                if on_stored is not None:
                    on_stored(item)
            else:
                outcome.refused[item.sop_instance_uid] = code or 0xC000
    _raise_if_left(outcome, target)
    return outcome
