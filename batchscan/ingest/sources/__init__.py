"""A PACS as the archive: the counterpart of :mod:`batchscan.ingest.discover` for studies
that live in a PACS or a VNA rather than in a folder.

A source answers two questions, behind one interface (:class:`PacsSource`) whatever the
protocol:

* :meth:`PacsSource.find` — which instances are there (for a date window, chest
  radiograph modalities unless told otherwise): one :class:`Locator` each, found by query
  at study, then series, then instance level (QIDO-RS in :mod:`.dicomweb`, C-FIND in
  :mod:`.dimse`);
* :meth:`PacsSource.fetch` — the instance's bytes as the PACS stores them (WADO-RS with
  ``transfer-syntax=*``, or C-GET), which the header and decode stages then read exactly as
  they read a file (:func:`batchscan.ingest.header.parse_file` takes bytes), so that a scan
  of the PACS scores what a scan of a folder of the same files scores.

Why the split, and why here: discovery and fetching are the first stage of the flow, and a
fetch belongs where a file is opened (the decode workers), so that many workers fetch at
once and the bytes never pass through the main process. Everything a source needs to
reopen itself in a worker process is in the picklable :class:`SourceOptions`.

Failures keep the flow's rule (a value, never an exception that escapes a stage) with one
exception that stops the run on purpose:

* :class:`FetchError` — a bad answer for one instance (broken multipart, wrong content
  type, too large, truncated, a hung transfer): the caller makes it a failed row with
  ``reason`` and goes on;
* :class:`PacsUnavailableError` — the PACS is down or stopped answering (a probe after a failure
  says so): the run stops (exit 1) in one line naming the PACS, keeping what was scored;
* :class:`SourceConfigError` — a bad URL, credentials file or TLS file (exit 2).

Credentials (:mod:`.credentials`) never appear in a message, a log line or a locator, and a
source never writes to the PACS: it only queries and retrieves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import urlsplit, urlunsplit

from batchscan.ingest.header import DEFAULT_MAX_PIXEL_BYTES
from batchscan.ingest.records import ImageRecord

#: Modalities queried by default: chest radiographs (computed and digital radiography).
DEFAULT_MODALITIES: Final = ("CR", "DX")
#: batchscan's own AE title when ``--calling-aet`` is not given.
DEFAULT_CALLING_AET: Final = "BATCHSCAN"
#: Seconds to wait for a connection, and for each answer (a hung transfer fails then).
CONNECT_TIMEOUT: Final = 10.0
ANSWER_TIMEOUT: Final = 60.0
#: Largest instance fetched: the pixel cap of the header stage plus room for the header,
#: so that a PACS answering with an endless body costs a bounded amount of memory.
DEFAULT_MAX_BYTES: Final = DEFAULT_MAX_PIXEL_BYTES + 16 * 1024 * 1024
#: Parallel connections to the PACS when not told (each decode worker holds one).
DEFAULT_CONNECTIONS: Final = 4
#: Days before the last run's high-water mark that a nightly run asks for again, for studies
#: that reach the PACS after their study date (``--late-margin-days``).
DEFAULT_LATE_MARGIN_DAYS: Final = 3
#: The reason a decode worker gives an instance it could not fetch because the PACS went
#: away: never a row of a report (the engine stops the run on it, and the next run fetches
#: the instance), only the signal from the worker to the run.
PACS_UNAVAILABLE: Final = "pacs_unavailable"

_UID: Final = re.compile(r"[0-9]+(\.[0-9]+)*")


class SourceConfigError(ValueError):
    """A bad PACS URL, credentials file, AE title or TLS file (exit 2)."""


class PacsUnavailableError(RuntimeError):
    """The PACS is down or stopped answering: the run stops (exit 1). The message names the
    PACS (:attr:`PacsSource.name`, never with credentials)."""


class FetchError(Exception):
    """A bad answer for one instance: a failed row with :attr:`reason` and :attr:`detail`.

    Reasons: ``too_large``, ``fetch_error:timeout``, ``fetch_error:truncated``,
    ``fetch_error:content_type``, ``fetch_error:bad_multipart``, ``fetch_error:http_NNN``,
    ``fetch_error:not_found`` (gone from the PACS since the query),
    ``fetch_error:status_0xNNNN`` (a C-GET failure status), ``fetch_error:no_context``
    (the PACS would not send that SOP class).
    """

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True, slots=True)
class Locator:
    """One instance in a PACS, as a query found it.

    Attributes
    ----------
    study_instance_uid, series_instance_uid, sop_instance_uid:
        The three UIDs that address it in both protocols.
    sop_class_uid:
        Its SOP class when the query returned it (C-GET negotiates storage by class).
    study_date:
        The study's date as ISO ``YYYY-MM-DD``, or None (the high-water mark of a nightly
        run is taken from it).
    modality:
        The series' modality, or None.
    stamp:
        What plays a file's mtime for the instance: its Instance Creation Date and Time
        as the query returned them, in nanoseconds since 1970 (read as UTC), or 0 when the
        PACS gave none. A PACS keeps no version of an instance; the standard gives an
        instance whose content changes a new SOP Instance UID, and this catches a PACS
        that replaced one under the same UIDs with a newly created copy.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str | None = None
    study_date: str | None = None
    modality: str | None = None
    stamp: int = 0

    @property
    def path(self) -> str:
        """The stable relative locator a report's ``path`` column holds:
        ``STUDY_UID/SERIES_UID/SOP_UID``."""
        return f"{self.study_instance_uid}/{self.series_instance_uid}/{self.sop_instance_uid}"

    def record(self) -> ImageRecord:
        """A pending record for this instance, keyed by :attr:`path` (its bytes are fetched,
        so ``abs_path`` names it too and is never opened), with what the query said of it:
        its UIDs, modality and study date (the header stage reads them again from the
        instance), :attr:`stamp` as its mtime, and its size unknown (-1) until it is
        fetched; so that an instance that cannot be fetched is still a row that names its
        study."""
        return ImageRecord(
            path=self.path,
            abs_path=self.path,
            mtime_ns=self.stamp,
            study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid,
            sop_instance_uid=self.sop_instance_uid,
            sop_class_uid=self.sop_class_uid,
            modality=self.modality,
            study_date=self.study_date,
        )

    @classmethod
    def from_path(cls, path: str) -> Locator:
        """The locator of a ``path`` column value (its UIDs; the rest unknown).

        Raises
        ------
        ValueError
            It is not three UIDs separated by ``/``.
        """
        parts = path.split("/")
        if len(parts) != 3 or not all(_UID.fullmatch(p) for p in parts):
            raise ValueError(f"not a PACS locator (STUDY/SERIES/SOP UIDs): {path!r}")
        return cls(*parts)


def instance_stamp(creation_date: object, creation_time: object) -> int:
    """:attr:`Locator.stamp` of an Instance Creation Date (DA) and Time (TM) as a query
    returned them (text, or None); 0 when the date is missing or not a date."""
    day = str(creation_date or "").strip()
    clock = re.sub(r"[^0-9.]", "", str(creation_time or ""))
    whole, _, fraction = clock.partition(".")
    whole = (whole + "000000")[:6]
    try:
        moment = datetime.strptime(day + whole, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return 0
    micro = int((fraction + "000000")[:6]) if fraction.isdigit() else 0
    seconds = int(moment.timestamp())
    return (seconds * 1_000_000 + micro) * 1000


def valid_uid(value: object) -> str | None:
    """`value` when it is a DICOM UID (digits and dots, at most 64 characters), else None:
    a UID from a PACS's answer goes into a URL and a report, so nothing else is let in."""
    text = str(value or "").strip().rstrip("\0")
    return text if len(text) <= 64 and _UID.fullmatch(text) else None


@dataclass(frozen=True, slots=True)
class Window:
    """The study dates a run asks the PACS for (both ends included; None: open).

    A nightly run asks from the last run's high-water mark less a margin for studies that
    arrive late (:meth:`nightly`); a backfill names both ends (``--since``/``--until``).
    """

    since: date | None = None
    until: date | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.since > self.until:
            raise SourceConfigError(f"--since {self.since} is after --until {self.until}")

    @classmethod
    def nightly(
        cls,
        high_water: date | None,
        margin_days: int,
        since: date | None = None,
        until: date | None = None,
    ) -> Window:
        """The window of a run: `since`/`until` when given (a backfill); otherwise from
        `high_water` less `margin_days` (every study when there is no mark yet: the first
        run), open at the end."""
        if margin_days < 0:
            raise SourceConfigError(f"the late-arrival margin must be >= 0 days, got {margin_days}")
        if since is None and high_water is not None:
            since = high_water - timedelta(days=margin_days)
        return cls(since, until)

    def dicom_range(self) -> str:
        """The DICOM date range matching these dates (``YYYYMMDD-YYYYMMDD``, open ends
        left empty; ``""`` matches every date)."""
        if self.since is None and self.until is None:
            return ""
        since = self.since.strftime("%Y%m%d") if self.since else ""
        until = self.until.strftime("%Y%m%d") if self.until else ""
        return since if since == until else f"{since}-{until}"


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """How to reach a PACS: everything but the URL, as paths and numbers so that it pickles
    to the decode workers (which reopen the source themselves).

    Attributes
    ----------
    calling_aet:
        batchscan's AE title (DIMSE).
    credentials:
        The file of ``--pacs-credentials`` (one line: ``user:password`` or
        ``Bearer TOKEN``), read when the source opens; None: no credentials.
    ca, cert, key:
        TLS: the CA that signed the PACS's certificate (None: the system's CAs) and
        batchscan's own certificate and key when the PACS asks for one.
    modalities:
        The modalities queried; empty: every modality (``--all-modalities``).
    connect_timeout, answer_timeout:
        Seconds to wait for a connection, and for each answer or a stalled transfer.
    max_bytes:
        Largest instance fetched (``too_large`` beyond).
    """

    calling_aet: str = DEFAULT_CALLING_AET
    credentials: Path | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    connect_timeout: float = CONNECT_TIMEOUT
    answer_timeout: float = ANSWER_TIMEOUT
    max_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True, slots=True)
class PacsArchive:
    """A PACS as the archive of ``batchscan scan URL``: the URL and the scan's PACS options,
    each field named as its option (``--pacs-credentials`` -> :attr:`pacs_credentials`),
    so that the command line fills it by name.

    Attributes
    ----------
    url:
        ``http(s)://…/dicom-web`` or ``dicom://AET@HOST:PORT``.
    pacs_credentials:
        The credentials file (:class:`SourceOptions`), or None.
    calling_aet, tls_ca, tls_cert, tls_key:
        batchscan's AE title and the TLS files (:class:`SourceOptions`).
    since, until:
        A backfill's window of study dates (both ends included); None: the nightly window
        (:meth:`window`).
    late_margin_days:
        Days before the high-water mark that a nightly run asks for again.
    pacs_connections:
        Connections to the PACS at once (each held by one decode process).
    pacs_timeout:
        Seconds to wait for each answer of the PACS (a hung transfer fails then).
    """

    url: str
    pacs_credentials: Path | None = None
    calling_aet: str = DEFAULT_CALLING_AET
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    since: date | None = None
    until: date | None = None
    late_margin_days: int = DEFAULT_LATE_MARGIN_DAYS
    pacs_connections: int = DEFAULT_CONNECTIONS
    pacs_timeout: float = ANSWER_TIMEOUT

    @property
    def name(self) -> str:
        """The PACS as messages, the manifest and the state name it: its URL without
        credentials."""
        return redact_url(self.url).rstrip("/")

    def source_options(self, all_modalities: bool = False) -> SourceOptions:
        """How a source reaches this PACS (every modality, or chest radiographs)."""
        return SourceOptions(
            calling_aet=self.calling_aet,
            credentials=self.pacs_credentials,
            ca=self.tls_ca,
            cert=self.tls_cert,
            key=self.tls_key,
            modalities=() if all_modalities else DEFAULT_MODALITIES,
            answer_timeout=self.pacs_timeout,
        )

    def window(self, high_water: date | None) -> Window:
        """The study dates this run asks for: ``--since``/``--until`` when given, else from
        the last complete run's `high_water` mark less the late-arrival margin (every date
        on the first run).

        Raises
        ------
        SourceConfigError
            ``--since`` after ``--until``, or a negative margin.
        """
        return Window.nightly(high_water, self.late_margin_days, self.since, self.until)

    def fetch_seconds(self) -> float:
        """The longest one fetch may take before it gives up: the answer timeout, then a
        probe of the PACS (a connection and an answer), added to a decode worker's file
        time limit so that a hung PACS is told apart from a hung codec."""
        return self.pacs_timeout + 2 * CONNECT_TIMEOUT


def high_water_after(old: date | None, window: Window, today: date) -> date:
    """The high-water mark after a complete run over `window`: the last day it covered
    (``--until``, else `today`; never a day to come), and never earlier than the `old`
    mark (a backfill of past years leaves the nightly mark where it was)."""
    covered = min(window.until or today, today)
    return covered if old is None else max(old, covered)


class PacsSource(Protocol):
    """What a scan needs of a PACS, whatever the protocol."""

    #: The PACS as messages name it: its URL without credentials.
    name: str

    def find(self, window: Window) -> Iterator[Locator]:
        """Every instance of the queried modalities in studies dated within `window`, each
        once, as the query proceeds.

        Raises
        ------
        PacsUnavailableError
            The PACS cannot be reached or stopped answering.
        """
        ...

    def fetch(self, locator: Locator) -> bytes:
        """The instance's bytes as the PACS stores them (a Part 10 file).

        Raises
        ------
        FetchError
            A bad answer for this instance (a failed row).
        PacsUnavailableError
            The PACS is down or stopped answering altogether.
        """
        ...

    def close(self) -> None:
        """Close the connections this source holds (safe to call twice)."""
        ...


def is_pacs_url(text: str) -> bool:
    """True when ``batchscan scan`` is given a PACS rather than a folder."""
    return re.match(r"(https?|dicom)://", text, re.IGNORECASE) is not None


def open_source(url: str, options: SourceOptions | None = None) -> PacsSource:
    """The source for a PACS URL: ``http(s)://…`` (a DICOMweb base) or
    ``dicom://AET@HOST:PORT`` (a DIMSE peer).

    Raises
    ------
    SourceConfigError
        The URL is neither, or the credentials or TLS files cannot be used.
    """
    options = options or SourceOptions()
    if re.match(r"https?://", url, re.IGNORECASE):
        from batchscan.ingest.sources.dicomweb import DicomWebSource

        return DicomWebSource(url, options)
    if re.match(r"dicom://", url, re.IGNORECASE):
        from batchscan.ingest.sources.dimse import DimseSource

        return DimseSource(url, options)
    raise SourceConfigError(
        f"a PACS is http(s)://HOST/…/dicom-web or dicom://AET@HOST:PORT, got {redact_url(url)!r}"
    )


def redact_url(url: str) -> str:
    """`url` without a ``user:password@`` part (an HTTP URL may carry credentials; messages
    never do). A ``dicom://AET@HOST:PORT`` keeps its AE title, which is no secret."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def fetch_all(
    source: PacsSource, locators: Iterable[Locator], connections: int = DEFAULT_CONNECTIONS
) -> Iterator[tuple[Locator, bytes | FetchError]]:
    """Fetch every locator over at most `connections` parallel connections, yielding each
    with its bytes or its :class:`FetchError` in the order given; at most twice
    `connections` instances are held at once.

    Raises
    ------
    PacsUnavailableError
        The PACS went away: the fetches under way are abandoned.
    """
    if connections < 1:
        raise SourceConfigError(f"--pacs-connections must be >= 1, got {connections}")

    def one(locator: Locator) -> bytes | FetchError:
        try:
            return source.fetch(locator)
        except FetchError as exc:
            return exc

    pending: list[tuple[Locator, Future[bytes | FetchError]]] = []
    with ThreadPoolExecutor(connections, thread_name_prefix="pacs-fetch") as pool:
        try:
            for locator in locators:
                pending.append((locator, pool.submit(one, locator)))
                if len(pending) >= 2 * connections:
                    first, future = pending.pop(0)
                    yield first, future.result()
            for locator, future in pending:
                yield locator, future.result()
        finally:
            for _, future in pending:
                future.cancel()
