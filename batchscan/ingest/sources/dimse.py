"""A DIMSE PACS as the archive: C-FIND to find, C-GET to fetch (pynetdicom).

``dicom://AET@HOST:PORT`` names the PACS's Query/Retrieve SCP; batchscan calls it as
``--calling-aet`` (the AE title the site registered with C-FIND and C-GET rights).

* **Find**: Study Root C-FIND at study level (the date window as a ``StudyDate`` range and,
  unless every modality is asked for, one query per modality by ``ModalitiesInStudy``),
  then series level (``Modality`` read and filtered), then image level (SOP Instance and
  Class UIDs).
* **Fetch**: C-GET of one instance at image level on the same association, which the PACS
  answers with a C-STORE sub-operation back on it (SCP/SCU role selection for the storage
  SOP classes). Storage contexts are proposed with every transfer syntax pynetdicom knows,
  uncompressed first among them being only a preference, so that the PACS can send the
  instance in the syntax it stored it in; the bytes come as the PACS encoded them
  (``encoded_dataset``), not a re-encoded dataset. C-GET rather than C-MOVE: the
  instance comes back on batchscan's own connection, so the PACS needs no route to
  batchscan and batchscan opens no listening port.

Each thread holds one association, reused for every fetch; a failed fetch is followed by a
C-ECHO on a fresh association, which tells a bad instance (a failed row) from a PACS that
went away (:class:`~batchscan.ingest.sources.PacsUnavailableError`). Credentials, when given,
travel as DICOM user identity negotiation (PS3.7 D.3.3.7: username and password, or a JSON
Web Token), over DICOM TLS when a CA is given. pynetdicom's logger is silenced: at debug
level it prints datasets and the user identity.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)
from pynetdicom.status import code_to_category

from batchscan import __version__
from batchscan.ingest.header import iso_date
from batchscan.ingest.sources import (
    FetchError,
    Locator,
    PacsUnavailableError,
    SourceConfigError,
    SourceOptions,
    Window,
    instance_stamp,
    valid_uid,
)
from batchscan.ingest.sources.credentials import Credentials

#: The storage SOP classes of chest radiographs (the default query's CR and DX).
RADIOGRAPH_CLASSES: Final = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)
#: The transfer syntaxes of the decode stage's codecs, each offered in a presentation
#: context of its own for each radiograph class: the PACS accepts one syntax per context,
#: so only separate contexts let it send every instance in the syntax it stored.
STORED_SYNTAXES: Final = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
    HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K,
)  # fmt: skip
#: The largest PDU batchscan receives. pynetdicom's default (16,382 bytes) splits a 2 MB
#: radiograph into 128 PDUs; 4 MiB lets the PACS send it in one (its own limit permitting).
MAX_PDU_SIZE: Final = 4 * 1024 * 1024
#: Presentation contexts an association may propose (PS3.8 9.3.2.2: 128, odd IDs 1-255).
_MAX_CONTEXTS: Final = 128

_AET: Final = re.compile(r"[ -\[\]-~]{1,16}")  # printable ASCII without backslash


def check_ae_title(ae_title: str, option: str) -> str:
    """An AE title as PS3.5 allows it: 1-16 printable ASCII characters, no backslash, not
    only spaces.

    Raises
    ------
    SourceConfigError
        It is not.
    """
    if not _AET.fullmatch(ae_title) or not ae_title.strip():
        raise SourceConfigError(
            f"{option}: an AE title is 1-16 printable ASCII characters without a "
            f"backslash, got {ae_title!r}"
        )
    return ae_title


@dataclass(frozen=True, slots=True)
class Peer:
    """A DICOM application entity: its AE title and network address."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, option: str) -> Peer:
        """Read ``AET@HOST:PORT`` (an IPv6 address in brackets: ``AET@[::1]:104``).

        Raises
        ------
        SourceConfigError
            The text is not of that form, or the AE title or port is not valid.
        """
        match = re.fullmatch(r"(.+)@(\[[0-9A-Fa-f:.]+\]|[^@:\[\]\s]+):(\d{1,5})", text)
        if match is None:
            raise SourceConfigError(f"{option} must be AET@HOST:PORT, got {text!r}")
        ae_title, host, port = match.group(1), match.group(2).strip("[]"), int(match.group(3))
        check_ae_title(ae_title, option)
        if not 1 <= port <= 65535:
            raise SourceConfigError(f"{option} port must be 1-65535, got {port}")
        return cls(ae_title, host, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def client_tls_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """A client TLS context: the peer's certificate and host name checked against `ca` (the
    system's CAs when None), TLS 1.2 or later, `cert`/`key` presented when given.

    Raises
    ------
    SourceConfigError
        A file is missing or not a certificate or key, or only one of cert and key is
        given.
    """
    if (cert is None) != (key is None):
        raise SourceConfigError("--tls-cert and --tls-key go together")
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=None if ca is None else str(ca)
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise SourceConfigError(f"TLS files cannot be used: {exc}") from exc
    return context


def quiet_pynetdicom() -> None:
    """Silence pynetdicom's logger (datasets and user identities at debug level)."""
    logger = logging.getLogger("pynetdicom")
    logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False


def no_delay(event: evt.Event) -> None:
    """Send each PDU at once (TCP_NODELAY): a DIMSE request is a command PDU then a data
    PDU, and with Nagle's algorithm the second waits for the peer's delayed ACK of the
    first, 40 ms a message on Linux (measured with Orthanc on loopback: a C-STORE 96 ms
    without, 54 with; a C-FIND about 100 ms without)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def user_identity(credentials: Credentials | None) -> list[UserIdentityNegotiation]:
    """The user identity item of an association request (none without credentials)."""
    if credentials is None:
        return []
    item = UserIdentityNegotiation()
    if credentials.token is not None:
        item.user_identity_type = 5  # JSON Web Token
        item.primary_field = credentials.token.encode()
    else:
        item.user_identity_type = 2  # username and passcode
        item.primary_field = (credentials.user or "").encode()
        item.secondary_field = (credentials.password or "").encode()
    return [item]


class _Received:
    """What the C-STORE sub-operations of one C-GET delivered (one association's)."""

    def __init__(self) -> None:
        self.instances: dict[str, bytes] = {}

    def on_store(self, event: evt.Event) -> int:
        """Keep the instance as the PACS encoded it; always accept (the stages judge)."""
        try:
            uid = str(event.request.AffectedSOPInstanceUID)
            self.instances[uid] = event.encoded_dataset(include_meta=True)
        except Exception:  # an undecodable sub-operation: the fetch reports it missing
            return 0xC210
        return 0x0000


class DimseSource:
    """A DIMSE PACS (see the module's docstring).

    Raises
    ------
    SourceConfigError
        A URL that is not ``dicom://AET@HOST:PORT``, a bad calling AE title, or credentials
        or TLS files that cannot be used.
    """

    def __init__(self, url: str, options: SourceOptions) -> None:
        match = re.fullmatch(r"(?i:dicom)://(.+)", url.strip())
        if match is None:
            raise SourceConfigError(f"a DIMSE PACS is dicom://AET@HOST:PORT, got {url!r}")
        self.peer = Peer.parse(match.group(1).rstrip("/"), "the PACS URL")
        self.name = f"dicom://{self.peer}"
        self.options = options
        check_ae_title(options.calling_aet, "--calling-aet")
        self._credentials = Credentials.from_file(options.credentials)
        self._tls = (
            client_tls_context(options.ca, options.cert, options.key)
            if options.ca is not None or options.cert is not None
            else None
        )
        quiet_pynetdicom()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[Association] = []
        self.bytes_fetched = 0
        self._others: tuple[str, ...] = ()
        if not options.modalities or not set(options.modalities) <= {"CR", "DX"}:
            # other modalities: as many other storage classes as fit, one context each
            # with every syntax (the PACS picks one, and may transcode to it)
            room = _MAX_CONTEXTS - 2 - len(RADIOGRAPH_CLASSES) * len(STORED_SYNTAXES)
            radiographs = {str(c) for c in RADIOGRAPH_CLASSES}
            self._others = tuple(
                c
                for c in (str(p.abstract_syntax) for p in StoragePresentationContexts)
                if c not in radiographs
            )[:room]
        self._classes: tuple[str, ...] = (*map(str, RADIOGRAPH_CLASSES), *self._others)

    # -- associations --------------------------------------------------------------------

    def _ae(self, *, retrieve: bool) -> AE:
        ae = AE(ae_title=self.options.calling_aet)
        ae.connection_timeout = self.options.connect_timeout
        ae.acse_timeout = self.options.answer_timeout
        ae.dimse_timeout = self.options.answer_timeout
        ae.network_timeout = self.options.answer_timeout
        ae.implementation_version_name = f"BATCHSCAN_{__version__}"[:16]
        ae.maximum_pdu_size = MAX_PDU_SIZE
        if retrieve:
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
            for sop_class in RADIOGRAPH_CLASSES:
                for syntax in STORED_SYNTAXES:
                    ae.add_requested_context(sop_class, syntax)
            for sop_class in self._others:
                ae.add_requested_context(sop_class, ALL_TRANSFER_SYNTAXES)
        else:
            ae.add_requested_context(Verification)
        return ae

    def _associate(self, *, retrieve: bool = True) -> tuple[Association, _Received]:
        """A new association (Find, Get and storage, or only Verification).

        Raises
        ------
        PacsUnavailableError
            The PACS cannot be reached or refuses batchscan.
        """
        received = _Received()
        ae = self._ae(retrieve=retrieve)
        tls_args = None if self._tls is None else (self._tls, self.peer.host)
        roles = [build_role(c, scp_role=True) for c in self._classes] if retrieve else []
        try:
            assoc = ae.associate(
                self.peer.host, self.peer.port, ae_title=self.peer.ae_title,
                ext_neg=[*roles, *user_identity(self._credentials)], tls_args=tls_args,
                evt_handlers=[(evt.EVT_C_STORE, received.on_store), (evt.EVT_CONN_OPEN, no_delay)],
            )  # fmt: skip
        except (OSError, ssl.SSLError, RuntimeError) as exc:
            raise PacsUnavailableError(f"PACS {self.name} cannot be reached ({exc})") from None
        if not assoc.is_established:
            why = (
                f"rejected the association from {self.options.calling_aet}"
                if assoc.is_rejected
                else "cannot be reached (down, another port, or a TLS mismatch)"
            )
            raise PacsUnavailableError(f"PACS {self.name} {why}")
        with self._lock:
            self._open.append(assoc)
        return assoc, received

    def _association(self) -> tuple[Association, _Received]:
        """This thread's association, opened again when it was lost."""
        held: tuple[Association, _Received] | None = getattr(self._local, "assoc", None)
        if held is None or not held[0].is_established:
            held = self._associate()
            self._local.assoc = held
        return held

    def _drop(self) -> None:
        """Forget (and abort) this thread's association after a failure."""
        held: tuple[Association, _Received] | None = getattr(self._local, "assoc", None)
        self._local.assoc = None
        if held is not None and held[0].is_established:
            with contextlib.suppress(Exception):
                held[0].abort()

    # -- find ----------------------------------------------------------------------------

    def _find(self, query: Dataset, what: str) -> list[Dataset]:
        """Every identifier a C-FIND answers, on this thread's association.

        Raises
        ------
        PacsUnavailableError
            The association failed, or the PACS answered with a failure status.
        """
        assoc, _ = self._association()
        answers: list[Dataset] = []
        try:
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            ):
                code = None if status is None else status.get("Status")
                if code is None:
                    self._drop()
                    raise PacsUnavailableError(
                        f"PACS {self.name} stopped answering while finding {what}"
                    )
                category = code_to_category(int(code))
                if category == "Pending" and identifier is not None:
                    answers.append(identifier)
                elif category not in ("Pending", "Success"):
                    raise PacsUnavailableError(
                        f"PACS {self.name} refused to find {what} (status 0x{int(code):04X}); "
                        f"does it give {self.options.calling_aet} C-FIND rights?"
                    )
        except (RuntimeError, ValueError) as exc:  # pynetdicom: the association is gone
            self._drop()
            raise PacsUnavailableError(
                f"PACS {self.name} failed while finding {what} ({exc})"
            ) from None
        return answers

    def _studies(self, window: Window) -> Iterator[tuple[str, str | None]]:
        seen: set[str] = set()
        for modality in self.options.modalities or (None,):
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = ""
            query.StudyDate = window.dicom_range()
            if modality is not None:
                query.ModalitiesInStudy = modality
            for answer in self._find(query, "studies"):
                uid = valid_uid(answer.get("StudyInstanceUID"))
                if uid is not None and uid not in seen:
                    seen.add(uid)
                    yield uid, iso_date(str(answer.get("StudyDate") or ""))

    def find(self, window: Window) -> Iterator[Locator]:
        """Every instance of the queried modalities in the window's studies."""
        wanted = set(self.options.modalities)
        for study, study_date in self._studies(window):
            query = Dataset()
            query.QueryRetrieveLevel = "SERIES"
            query.StudyInstanceUID = study
            query.SeriesInstanceUID = ""
            query.Modality = ""
            series_seen: set[str] = set()
            for series in self._find(query, f"the series of study {study}"):
                series_uid = valid_uid(series.get("SeriesInstanceUID"))
                modality = str(series.get("Modality") or "") or None
                if series_uid is None or series_uid in series_seen:
                    continue
                series_seen.add(series_uid)
                if wanted and modality not in wanted:
                    continue
                images = Dataset()
                images.QueryRetrieveLevel = "IMAGE"
                images.StudyInstanceUID = study
                images.SeriesInstanceUID = series_uid
                images.SOPInstanceUID = ""
                images.SOPClassUID = ""
                images.InstanceCreationDate = ""
                images.InstanceCreationTime = ""
                sops: set[str] = set()
                for image in self._find(images, f"the instances of series {series_uid}"):
                    sop = valid_uid(image.get("SOPInstanceUID"))
                    if sop is not None and sop not in sops:
                        sops.add(sop)
                        stamp = instance_stamp(
                            image.get("InstanceCreationDate"), image.get("InstanceCreationTime")
                        )
                        yield Locator(study, series_uid, sop,
                                      valid_uid(image.get("SOPClassUID")), study_date,
                                      modality, stamp)  # fmt: skip

    # -- fetch ---------------------------------------------------------------------------

    def fetch(self, locator: Locator) -> bytes:
        """The instance as the PACS encoded it, by C-GET (see the module's docstring)."""
        if locator.sop_class_uid is not None and locator.sop_class_uid not in self._classes:
            raise FetchError(
                "fetch_error:no_context",
                f"SOP class {locator.sop_class_uid} is not among those batchscan retrieves",
            )
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = locator.study_instance_uid
        query.SeriesInstanceUID = locator.series_instance_uid
        query.SOPInstanceUID = locator.sop_instance_uid
        assoc, received = self._association()
        received.instances.clear()
        final: int | None = None
        try:
            for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                code = None if status is None else status.get("Status")
                if code is None:
                    final = None
                    break
                final = int(code)
        except (RuntimeError, ValueError):
            final = None
        data = received.instances.pop(locator.sop_instance_uid, None)
        received.instances.clear()
        if final is None:  # no answer: the association was lost or timed out
            self._drop()
            if data is None:
                raise self._after_failure("fetch_error:timeout", "no answer to the C-GET")
        elif data is None:
            category = code_to_category(final)
            if category in ("Success", "Warning"):
                raise FetchError("fetch_error:not_found", "the C-GET delivered no instance")
            if final in (0xA701, 0xA702):  # out of resources
                raise self._after_failure(
                    f"fetch_error:status_0x{final:04X}", "the PACS is out of resources"
                )
            raise FetchError(f"fetch_error:status_0x{final:04X}", "the C-GET failed")
        if len(data) > self.options.max_bytes:
            raise FetchError("too_large", f"{len(data)} bytes, cap {self.options.max_bytes}")
        with self._lock:
            self.bytes_fetched += len(data)
        return data

    def _after_failure(self, reason: str, detail: str) -> BaseException:
        """A C-ECHO on a fresh association after a failed fetch: a :class:`FetchError` when
        the PACS answers it, :class:`PacsUnavailableError` when not."""
        try:
            assoc, _ = self._associate(retrieve=False)
        except PacsUnavailableError as exc:
            return exc
        try:
            status = assoc.send_c_echo()
        except (RuntimeError, ValueError):
            status = None
        finally:
            with contextlib.suppress(Exception):
                assoc.release()
        if status is None or status.get("Status") is None:
            return PacsUnavailableError(f"PACS {self.name} stopped answering")
        return FetchError(reason, detail)

    def close(self) -> None:
        """Release every association this source opened."""
        with self._lock:
            held, self._open = self._open, []
        for assoc in held:
            if assoc.is_established:
                with contextlib.suppress(Exception):
                    assoc.release()
        self._local = threading.local()
