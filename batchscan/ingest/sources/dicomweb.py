"""A DICOMweb PACS as the archive: QIDO-RS to find, WADO-RS to fetch.

* **Find**: dicomweb-client's QIDO-RS searches, study level (the date window and, unless
  every modality is asked for, one query per modality by ``ModalitiesInStudy``), then the
  series of each study (filtered by ``Modality``), then the instances of each series. Every
  search asks for the remaining pages (``offset``), so a PACS that pages its answers loses
  nothing.
* **Fetch**: WADO-RS Retrieve Instance with ``Accept: multipart/related;
  type="application/dicom"; transfer-syntax=*``, so the PACS sends the instance in the
  syntax it stored (no transcoding on the PACS, the bytes a folder would hold), and
  ``Accept-Encoding: identity`` (:data:`FETCH_HEADERS`: no gzip of pixel data). This one
  request is made here on the same HTTP session rather than by dicomweb-client's
  ``retrieve_instance``, because that returns a dataset parsed and re-encoded in memory
  with no limit on its size: the scan needs the stored bytes (read by the same stages as a
  file), a bound on what a broken PACS can make it hold (:attr:`SourceOptions.max_bytes`),
  and each bad answer as a reason. The multipart body is checked strictly
  (:func:`single_part`): one part, of type ``application/dicom``, closed by its boundary.

Authentication is the session's (HTTP basic or a bearer token from the credentials file);
TLS checks the PACS's certificate against ``ca`` (or the system's CAs) and presents
``cert``/``key`` when given. dicomweb-client's and urllib3's loggers are silenced: at debug
level they print request headers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from email.message import Message
from typing import Any, Final
from urllib.parse import urlsplit

import requests
from dicomweb_client import DICOMwebClient

from batchscan.ingest.header import iso_date
from batchscan.ingest.sources import (
    FetchError,
    Locator,
    PacsUnavailableError,
    SourceConfigError,
    SourceOptions,
    Window,
    instance_stamp,
    redact_url,
    valid_uid,
)
from batchscan.ingest.sources.credentials import Credentials

#: The headers of a fetch: the instance as stored, one part, and not compressed for the
#: wire. requests asks for gzip by default, and a PACS that honours it (Orthanc does)
#: deflates megabytes of pixel data that are mostly compressed already, on its CPU and
#: then on ours: measured on loopback with Orthanc 1.10, a 2 MB radiograph took 956 ms
#: with gzip and 52 ms without (curl, which asks for no encoding, 25 ms).
FETCH_HEADERS: Final = {
    "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
    "Accept-Encoding": "identity",
}
#: Bytes read from the network at a time.
_CHUNK: Final = 1 << 20
#: Room for the multipart framing beyond the instance itself.
_FRAMING: Final = 64 * 1024
#: Answers asked for per search request.
_PAGE: Final = 1000
#: What an instance search asks for besides the UIDs: the class (C-GET negotiates by it) and
#: the creation date and time (:attr:`~batchscan.ingest.sources.Locator.stamp`).
_INSTANCE_FIELDS: Final = ["SOPClassUID", "InstanceCreationDate", "InstanceCreationTime"]

# DICOM JSON tags of the attributes the queries read (PS3.18 F.2).
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_SOP_CLASS, _STUDY_DATE, _MODALITY = "00080016", "00080020", "00080060"
_CREATED_DATE, _CREATED_TIME = "00080012", "00080013"


def _quiet_loggers() -> None:
    for name in ("dicomweb_client", "urllib3"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.CRITICAL + 1)
        logger.propagate = False


def _value(item: dict[str, Any], tag: str) -> Any:
    """The first value of `tag` in a DICOM JSON object, or None."""
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def single_part(body: bytes, content_type: str) -> bytes:
    """The one ``application/dicom`` part of a WADO-RS answer.

    A body sent as plain ``application/dicom`` (some PACS do, against the standard) is
    taken as it is.

    Raises
    ------
    FetchError
        ``fetch_error:content_type`` for any other type; ``fetch_error:bad_multipart`` for
        no boundary, no part, more than one part, or a part of another type;
        ``fetch_error:truncated`` when the closing boundary never comes.
    """
    header = Message()
    header["content-type"] = content_type
    media = header.get_content_type()
    if media == "application/dicom":
        return body
    if media != "multipart/related":
        raise FetchError("fetch_error:content_type", f"answer of type {media}")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise FetchError("fetch_error:bad_multipart", "multipart answer without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    if start < 0:
        raise FetchError("fetch_error:bad_multipart", "no part in the answer")
    headers_start = start + len(delimiter)
    if body[headers_start : headers_start + 2] != b"\r\n":
        raise FetchError("fetch_error:bad_multipart", "the first boundary opens no part")
    headers_end = body.find(b"\r\n\r\n", headers_start)
    if headers_end < 0:
        raise FetchError("fetch_error:truncated", "the answer ends in the part's headers")
    part_headers = Message()
    for line in body[headers_start + 2 : headers_end].split(b"\r\n"):
        name, colon, value = line.decode("latin-1").partition(":")
        if colon:
            part_headers[name.strip()] = value.strip()
    part_type = part_headers.get("content-type")
    if part_type is not None and part_headers.get_content_type() != "application/dicom":
        raise FetchError(
            "fetch_error:bad_multipart", f"part of type {part_headers.get_content_type()}"
        )
    content_start = headers_end + 4
    end = body.find(b"\r\n" + delimiter, content_start)
    if end < 0:
        raise FetchError("fetch_error:truncated", "the answer ends before its closing boundary")
    after = body[end + 2 + len(delimiter) : end + 4 + len(delimiter)]
    if after != b"--":
        raise FetchError("fetch_error:bad_multipart", "more than one part for one instance")
    return body[content_start:end]


def check_url(url: str) -> str:
    """A DICOMweb base URL without a trailing ``/``.

    Raises
    ------
    SourceConfigError
        It is not HTTP(S), or it carries credentials (named without them).
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise SourceConfigError(f"not a DICOMweb URL: {redact_url(url)!r}")
    if "@" in parts.netloc:
        raise SourceConfigError(
            f"{redact_url(url)}: credentials go in --pacs-credentials FILE, not in the URL"
        )
    return url.rstrip("/")


def http_session(options: SourceOptions, credentials: Credentials | None) -> requests.Session:
    """An HTTP session for a DICOMweb PACS: its certificate checked against ``options.ca``
    (the system's CAs when None), ``cert``/``key`` presented when given, the credentials'
    ``Authorization`` header on every request, and nothing taken from the environment
    (no ``.netrc``, no proxy variables).

    Raises
    ------
    SourceConfigError
        A TLS file is missing, or only one of cert and key is given.
    """
    for path in (options.ca, options.cert, options.key):
        if path is not None and not path.is_file():
            raise SourceConfigError(f"TLS file {path} does not exist")
    if (options.cert is None) != (options.key is None):
        raise SourceConfigError("--tls-cert and --tls-key go together")
    _quiet_loggers()
    session = requests.Session()
    session.trust_env = False
    session.verify = str(options.ca) if options.ca is not None else True
    if options.cert is not None and options.key is not None:
        session.cert = (str(options.cert), str(options.key))
    if credentials is not None:
        session.headers["Authorization"] = credentials.authorization()
    return session


def dicomweb_client(base: str, session: requests.Session, options: SourceOptions) -> DICOMwebClient:
    """dicomweb-client on `session`, with the options' timeouts and three tries with a short
    back-off for the statuses it retries (429, 408, 503, 504)."""
    client = DICOMwebClient(
        base, session=session, timeout=(options.connect_timeout, options.answer_timeout)
    )
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=500)
    return client


class DicomWebSource:
    """A DICOMweb PACS (see the module's docstring).

    Parameters
    ----------
    url:
        The DICOMweb base (``https://pacs.example/dicom-web``), without credentials.
    options:
        Credentials file, TLS files, modalities, timeouts, size cap.

    Raises
    ------
    SourceConfigError
        A URL that carries credentials or is not HTTP(S), or credentials or TLS files that
        cannot be used.
    """

    def __init__(self, url: str, options: SourceOptions) -> None:
        self.base = check_url(url)
        self.name = self.base
        self.options = options
        self._credentials = Credentials.from_file(options.credentials)
        http_session(options, self._credentials).close()  # refuse bad TLS files now
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self.bytes_fetched = 0

    # -- connections ---------------------------------------------------------------------

    def _session(self) -> requests.Session:
        """This thread's HTTP session (requests' sessions are not shared between threads)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = http_session(self.options, self._credentials)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _client(self) -> DICOMwebClient:
        """A dicomweb-client on this thread's session."""
        client: DICOMwebClient | None = getattr(self._local, "client", None)
        if client is None:
            client = dicomweb_client(self.base, self._session(), self.options)
            self._local.client = client
        return client

    def _unavailable(self, exc: BaseException, doing: str) -> PacsUnavailableError:
        """The one line that stops a run: the PACS by its URL and what failed, never the
        request's headers."""
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            status = exc.response.status_code
            why = {401: "refused the credentials (HTTP 401)",
                   403: "does not let these credentials read (HTTP 403)"}.get(
                status, f"answered HTTP {status}")  # fmt: skip
        elif isinstance(exc, requests.exceptions.SSLError):
            why = "failed the TLS check (certificate or CA)"
        elif isinstance(exc, requests.Timeout):
            why = "stopped answering (timed out)"
        else:
            why = "cannot be reached (down, or another address)"
        return PacsUnavailableError(f"PACS {self.name} {why} while {doing}")

    # -- find ----------------------------------------------------------------------------

    def _search(self, what: str, key: str, call: Any) -> list[dict[str, Any]]:
        """Every answer of a search, page by page (``offset``/``limit``), each `key` UID
        once.

        dicomweb-client's own ``get_remaining`` asks for the next page until one comes back
        empty, which never happens with a PACS that ignores ``offset`` for some filters
        (Orthanc's DICOMweb plugin 1.7 with ``ModalitiesInStudy``): the pages are asked
        for here, and the search ends at a short page or at a page with nothing new.
        """
        found: dict[str, dict[str, Any]] = {}
        offset = 0
        while True:
            try:
                page = call(offset=offset, limit=_PAGE)
            except (requests.RequestException, OSError) as exc:
                raise self._unavailable(exc, f"searching {what}") from None
            except ValueError as exc:  # not JSON: a proxy's error page, a broken PACS
                raise PacsUnavailableError(
                    f"PACS {self.name} answered a search for {what} with no DICOM JSON ({exc})"
                ) from None
            if not isinstance(page, list):
                raise PacsUnavailableError(
                    f"PACS {self.name} answered a search for {what} with no list"
                )
            before = len(found)
            for item in page:
                uid = valid_uid(_value(item, key)) if isinstance(item, dict) else None
                if uid is not None:
                    found.setdefault(uid, item)
            if len(page) < _PAGE or len(found) == before:
                return list(found.values())
            offset += len(page)

    def _studies(self, window: Window) -> Iterator[tuple[str, str | None]]:
        """(Study Instance UID, ISO study date) of each study in the window, each once."""
        client = self._client()
        filters: dict[str, Any] = {}
        if dates := window.dicom_range():
            filters["StudyDate"] = dates
        seen: set[str] = set()
        for modality in self.options.modalities or (None,):
            query = dict(filters)
            if modality is not None:
                query["ModalitiesInStudy"] = modality
            found = self._search(
                "studies",
                _STUDY_UID,
                lambda q=query, **page: client.search_for_studies(
                    search_filters=q, fields=["StudyDate"], **page
                ),
            )
            for item in found:
                uid = valid_uid(_value(item, _STUDY_UID))
                if uid is not None and uid not in seen:
                    seen.add(uid)
                    yield uid, iso_date(str(_value(item, _STUDY_DATE) or ""))

    def find(self, window: Window) -> Iterator[Locator]:
        """Every instance of the queried modalities in the window's studies (see the
        module's docstring)."""
        client = self._client()
        wanted = set(self.options.modalities)
        for study, study_date in self._studies(window):
            series = self._search(
                f"the series of study {study}",
                _SERIES_UID,
                lambda s=study, **page: client.search_for_series(s, fields=["Modality"], **page),
            )
            for item in series:
                series_uid = valid_uid(_value(item, _SERIES_UID))
                modality = str(_value(item, _MODALITY) or "") or None
                if series_uid is None or (wanted and modality not in wanted):
                    continue
                instances = self._search(
                    f"the instances of series {series_uid}",
                    _SOP_UID,
                    lambda s=study, r=series_uid, **page: client.search_for_instances(
                        s, r, fields=_INSTANCE_FIELDS, **page
                    ),
                )
                for instance in instances:
                    sop = valid_uid(_value(instance, _SOP_UID))
                    if sop is not None:
                        stamp = instance_stamp(
                            _value(instance, _CREATED_DATE), _value(instance, _CREATED_TIME)
                        )
                        yield Locator(study, series_uid, sop,
                                      valid_uid(_value(instance, _SOP_CLASS)), study_date,
                                      modality, stamp)  # fmt: skip

    # -- fetch ---------------------------------------------------------------------------

    def _instance_url(self, locator: Locator) -> str:
        return (
            f"{self.base}/studies/{locator.study_instance_uid}/series/"
            f"{locator.series_instance_uid}/instances/{locator.sop_instance_uid}"
        )

    def fetch(self, locator: Locator) -> bytes:
        """The instance as the PACS stores it (see the module's docstring)."""
        for uid in (locator.study_instance_uid, locator.series_instance_uid,
                    locator.sop_instance_uid):  # fmt: skip
            if valid_uid(uid) != uid:
                raise FetchError("fetch_error:bad_locator", "not a DICOM UID")
        timeout = (self.options.connect_timeout, self.options.answer_timeout)
        try:
            answer = self._session().get(
                self._instance_url(locator), headers=FETCH_HEADERS, stream=True,
                timeout=timeout
            )  # fmt: skip
        except requests.Timeout as exc:
            raise self._after_failure(exc, "fetch_error:timeout") from None
        except (requests.RequestException, OSError) as exc:
            raise self._unavailable(exc, "fetching an instance") from None
        with answer:
            self._check_status(answer)
            body = self._read_body(answer)
        with self._lock:
            self.bytes_fetched += len(body)
        return single_part(body, answer.headers.get("Content-Type", ""))

    def _check_status(self, answer: requests.Response) -> None:
        status = answer.status_code
        if status == 200:
            return
        if status in (401, 403):
            raise self._unavailable(requests.HTTPError(response=answer), "fetching an instance")
        if status in (404, 410):
            raise FetchError("fetch_error:not_found", f"HTTP {status}: gone from the PACS")
        if status in (502, 503, 504):
            raise self._after_failure(
                requests.HTTPError(response=answer), f"fetch_error:http_{status}"
            )
        raise FetchError(f"fetch_error:http_{status}", f"HTTP {status} {answer.reason}")

    def _read_body(self, answer: requests.Response) -> bytes:
        """The whole body, up to the size cap; a transfer that stalls or is cut is a
        :class:`FetchError`."""
        cap = self.options.max_bytes + _FRAMING
        declared = answer.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise FetchError("too_large", f"the PACS announces {declared} bytes, cap {cap}")
        body = bytearray()
        try:
            for chunk in answer.iter_content(_CHUNK):
                body += chunk
                if len(body) > cap:
                    raise FetchError("too_large", f"more than {cap} bytes")
        except requests.exceptions.ChunkedEncodingError as exc:
            raise FetchError("fetch_error:truncated", f"the transfer was cut ({exc})") from None
        except requests.exceptions.ConnectionError as exc:
            # a stalled read ("Read timed out") or a reset connection in the middle of a body
            raise self._after_failure(
                exc, "fetch_error:timeout" if "timed out" in str(exc) else "fetch_error:truncated"
            ) from None
        return bytes(body)

    def _after_failure(self, exc: BaseException, reason: str) -> BaseException:
        """After a fetch timed out, was cut or was refused by an overloaded gateway: a
        :class:`FetchError` when the PACS still answers a search (this instance's
        problem), else :class:`PacsUnavailableError` (the PACS's)."""
        try:
            self._session().get(
                f"{self.base}/studies",
                params={"limit": "1"},
                headers={"Accept": "application/dicom+json"},
                timeout=(self.options.connect_timeout, self.options.connect_timeout),
            ).raise_for_status()
        except (requests.RequestException, OSError):
            return self._unavailable(exc, "fetching an instance")
        detail = type(exc).__name__
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            detail = f"HTTP {exc.response.status_code}"
        return FetchError(reason, detail)

    def close(self) -> None:
        """Close every thread's HTTP session."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            with contextlib.suppress(Exception):
                session.close()
        self._local = threading.local()
