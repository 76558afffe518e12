"""Every option of every subcommand, declared once (as pip's ``cmdoptions``).

:data:`COMMANDS` is the one table. Each :class:`Option` gives its name, its kind (how its text
becomes a value, and its TOML type), choices, default, help, metavar, its key in the config
file (or why the file does not take it) and its environment variable where there is one; each
:class:`Command` its options and its exit codes with their meaning. Everything else is made
from it: the argument parser (:func:`batchscan.cli.build_parser`), the config file's keys
(:func:`batchscan.config.load_config`), ``jobs/deploy/cron/batchscan.example.toml``
(``python -m batchscan.options``), the command-line reference (``docs/cli.md``, through
``docs/hooks.py``) and the contract that ``tests/test_contract.py`` holds the code to.

Adding an option
----------------
1. Add one :class:`Option` to its command's tuple in :data:`COMMANDS` (in the order ``--help``
   should show it). Its config key is its dest (``--drift-reference`` -> ``drift_reference``)
   unless ``config`` names another; a command that reads ``--config`` must give either a key
   or ``no_config`` (the reason), or a test fails. A default the code owns is a
   :class:`FromCode`, so that the help cannot drift from the code.
2. Add its line to ``tests/contract/interface.toml``; ``pytest tests/test_contract.py`` prints
   the exact line when it is missing.
3. For a config key, run ``python -m batchscan.options > jobs/deploy/cron/batchscan.example.toml``.

The value reaches the command as ``args.<dest>``: ``cli`` passes every option whose dest is a
field of the command's request (:class:`batchscan.engines.pipeline.ScanConfig`,
``TrainRequest``, ``AdaptRequest``) to it by name, so an option named like its field needs no
change in ``cli.py``.

This module imports nothing heavy: a default that lives in a module of the flow is a
:class:`FromCode`, read only when a parser for its command is made.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from functools import cache
from pathlib import Path
from typing import Any, Final

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3

#: The config file of a nightly installation that :func:`example_config` writes.
EXAMPLE_CONFIG: Final = "jobs/deploy/cron/batchscan.example.toml"
#: The environment variable that holds the pseudonymisation key itself (not a file name).
PSEUDONYM_KEY_ENV: Final = "BATCHSCAN_PSEUDONYM_KEY"


# --- kinds: how an option's text becomes its value -------------------------------------------


@dataclass(frozen=True)
class _IntAtLeast:
    minimum: int

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < self.minimum:
            raise argparse.ArgumentTypeError(f"must be at least {self.minimum}: {text}")
        return value


def seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def iso_date(text: str) -> date:
    """An ISO date (YYYY-MM-DD)."""
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def date_range(text: str) -> tuple[date, date]:
    """Two ISO dates, ``FROM..TO`` (both days inside), FROM not after TO."""
    first, dots, last = text.partition("..")
    if not dots:
        raise argparse.ArgumentTypeError(f"{text!r} is not FROM..TO (two dates YYYY-MM-DD)")
    start, end = iso_date(first.strip()), iso_date(last.strip())
    if start > end:
        raise argparse.ArgumentTypeError(f"{text!r}: FROM is after TO")
    return start, end


@dataclass(frozen=True)
class Kind:
    """What an option's value is.

    Attributes
    ----------
    name:
        How the reference and the contract name it (``int >= 1``).
    toml:
        The TOML type the config file must give (``str`` for a path).
    parse:
        Text to value (argparse's ``type``); raises ``argparse.ArgumentTypeError`` with a
        one-line message. None for a flag.
    path:
        A path: read from the config file, it is taken relative to the file's folder (a
        value that `parse` keeps as text, a URL, is taken as it is).
    """

    name: str
    toml: type
    parse: Callable[[str], Any] | None
    path: bool = False


def archive_or_url(text: str) -> Path | str:
    """An archive folder (a path), or a PACS URL (``http(s)://…``, ``dicom://…``) kept as
    text."""
    return text if re.match(r"(https?|dicom)://", text, re.IGNORECASE) else Path(text)


TEXT: Final = Kind("text", str, str)
PATH: Final = Kind("path", str, Path, path=True)
ARCHIVE: Final = Kind("path or PACS URL", str, archive_or_url, path=True)
NUMBER: Final = Kind("number", float, float)
INTEGER: Final = Kind("int", int, int)
SECONDS: Final = Kind("seconds > 0", float, seconds)
DATE: Final = Kind("date YYYY-MM-DD", str, iso_date)
DATES: Final = Kind("dates YYYY-MM-DD..YYYY-MM-DD", str, date_range)
FLAG: Final = Kind("flag", bool, None)
VERSION: Final = Kind("prints the version", bool, None)


def at_least(minimum: int) -> Kind:
    """An integer of at least `minimum`."""
    return Kind(f"int >= {minimum}", int, _IntAtLeast(minimum))


# --- values the code owns ---------------------------------------------------------------------


@dataclass(frozen=True)
class FromCode:
    """A default (or a figure a help text quotes) that the code decides, named by where it
    lives and read when a parser for its command is made, so that the help says what the
    code does and ``batchscan scan`` does not import the trainer.

    Attributes
    ----------
    module, name:
        ``name`` is an attribute path in ``module``; a field of a dataclass gives its
        default (``"TrainConfig.epochs"``).
    call:
        Call it (``default_workers``): the value depends on the machine.
    shown:
        How help, reference and contract show a value that depends on the machine.
    """

    module: str
    name: str
    call: bool = False
    shown: str | None = None

    def value(self) -> Any:
        found = _resolve(self.module, self.name)
        return found() if self.call else found


@cache
def _resolve(module: str, name: str) -> Any:
    found: Any = importlib.import_module(module)
    for part in name.split("."):
        fields = getattr(found, "__dataclass_fields__", None)
        if isinstance(found, type) and fields and part in fields:
            found = fields[part].default
        elif isinstance(found, Mapping):  # a constant by key (``REFERENCE_PERIODS.day``)
            found = found[part]
        else:
            found = getattr(found, part)
    return found


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# --- options and commands ---------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option (or positional argument) of one subcommand.

    Attributes
    ----------
    name:
        The flag (``--batch-size``) or, for a positional argument, its metavar
        (``ARCHIVE_DIR``).
    help:
        One line for ``--help``; ``{default}`` and the keys of `quotes` are filled in.
    kind:
        What the value is (:class:`Kind`).
    choices:
        The values allowed, if only some are.
    default:
        The value when the option is not given: a value, or a :class:`FromCode`.
    metavar:
        The value's name in ``--help``.
    dest:
        The attribute on argparse's namespace (default: from `name`; required for a
        positional argument).
    required:
        Must be given; in a command that reads ``--config``, on the command line or in the
        file.
    config:
        The config-file key, when it is not `dest` (``--to`` is ``send_to``).
    no_config:
        Why the config file does not take it (a command that reads ``--config`` must give a
        key or a reason).
    env:
        An environment variable that stands in for the option.
    quotes:
        Figures of the code that `help` names (``{fine_tune}``).
    example:
        A value for ``batchscan.example.toml`` where the default is none or the machine's.
    """

    name: str
    help: str
    kind: Kind = TEXT
    choices: tuple[str, ...] = ()
    default: Any = None
    metavar: str | None = None
    dest: str = ""
    required: bool = False
    config: str | None = None
    no_config: str | None = None
    env: str | None = None
    quotes: Mapping[str, FromCode] = field(default_factory=dict)
    example: Any = None

    def __post_init__(self) -> None:
        if not self.dest:
            if self.positional:
                raise ValueError(f"positional {self.name} needs a dest")
            object.__setattr__(self, "dest", self.name.lstrip("-").replace("-", "_"))

    @property
    def positional(self) -> bool:
        return not self.name.startswith("-")

    @property
    def key(self) -> str | None:
        """The config-file key (in a command that reads ``--config``), or None when the file
        does not take the option."""
        return None if self.no_config else (self.config or self.dest)

    def default_value(self) -> Any:
        return self.default.value() if isinstance(self.default, FromCode) else self.default

    def shown_default(self) -> str | None:
        """The default as help, reference and contract show it; None when there is none."""
        if isinstance(self.default, FromCode) and self.default.shown:
            return self.default.shown
        value = self.default_value()
        return None if value is None or self.kind in (FLAG, VERSION) else _shown(value)

    def help_text(self) -> str:
        quoted = {k: v.value() for k, v in self.quotes.items()}
        return self.help.format(default=self.shown_default(), **quoted)

    @property
    def usage_name(self) -> str:
        """How messages and the reference name it (``--out REPORT_DIR``, ``ARCHIVE_DIR``,
        ``--engine local|ray``)."""
        value = self.metavar or "|".join(self.choices)
        return f"{self.name} {value}" if value and not self.positional else self.name


@dataclass(frozen=True)
class Command:
    """A subcommand: its options and what its exit codes mean."""

    name: str
    help: str
    options: tuple[Option, ...]
    exits: Mapping[int, str]
    #: Groups of options of which at least one must be given (on the command line or in
    #: the config file): ``send``'s destinations.
    any_of: tuple[tuple[str, ...], ...] = ()

    @property
    def reads_config(self) -> bool:
        return any(o.name == "--config" for o in self.options)

    def defaults_from(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The argparse defaults (by dest) that a read config file gives this command: the
        keys of its own options; keys meant for another command are left to it."""
        if not self.reads_config:
            return {}
        return {o.dest: values[o.key] for o in self.options if o.key in values}

    def missing(self, args: argparse.Namespace) -> str | None:
        """The one-line error for a required value given neither on the command line nor in
        the config file; None when all are there."""
        for option in self.options:
            if option.required and self.reads_config and getattr(args, option.dest) is None:
                return f"{option.usage_name} is required (on the command line or in --config)"
        for group in self.any_of:
            named = [o for o in self.options if o.name in group]
            if all(getattr(args, o.dest) is None for o in named):
                which = " or ".join(o.usage_name for o in named)
                return f"{which} is required (on the command line or in --config)"
        return None


# --- the table --------------------------------------------------------------------------------

_PIPELINE: Final = "batchscan.engines.pipeline"
_SITE_TRAINING: Final = "batchscan.site.site_training"
_MONITORING: Final = "batchscan.site.monitoring"
ALL_CORES: Final = FromCode(_PIPELINE, "default_workers", call=True, shown="all cores")


def _scan_default(name: str) -> FromCode:
    """The default of a :class:`~batchscan.engines.pipeline.ScanConfig` field."""
    return FromCode(_PIPELINE, f"ScanConfig.{name}")


CONFIG: Final = Option(
    "--config",
    kind=PATH,
    metavar="PATH",
    no_config="it names the file",
    help="TOML file of options, the long names with _ for - (e.g. batch_size = 512); one "
    "file serves scan and send; options on the command line win",
)
NO_PROGRESS: Final = Option("--no-progress", kind=FLAG, help="no progress bars")
WORKERS: Final = Option(
    "--workers",
    kind=at_least(0),
    default=ALL_CORES,
    metavar="N",
    example=6,
    help="decode processes (default: {default}; 0: in-process)",
)
UNCERTAIN: Final = Option(
    "--uncertain",
    choices=("drop", "pneumonia", "normal"),
    default="drop",
    help="labels marked uncertain: left out and counted (drop, default), or counted as "
    "pneumonia or normal",
)
PSEUDONYM_KEY_FILE: Final = Option(
    "--pseudonym-key-file",
    kind=PATH,
    metavar="PATH",
    env=PSEUDONYM_KEY_ENV,
    example="/etc/batchscan/pseudonym.key",
    help="key for the patient_key column (HMAC-SHA256 of PatientID); also "
    f"{PSEUDONYM_KEY_ENV}; without a key there is no patient_key column",
)
REPORTS_FILE: Final = Option(
    "--reports-file",
    kind=PATH,
    metavar="PATH",
    example="/ris/exports/",
    help="the site's RIS export of radiology reports (a file as batchscan labels reads, "
    "or a folder of them): new or changed reports are labelled and the model is "
    "measured against them per period (performance.parquet, discrepancies.parquet)",
)
NAME: Final = Option("--name", default="site_cnn", help="model file stem (default {default})")
BALANCE: Final = Option(
    "--balance",
    choices=("none", "view"),
    default="none",
    help="view: weight examples so that every view carries the same class balance (the "
    "view can then not stand in for the lungs); none (default): class weighting only",
)
PATIENCE: Final = Option(
    "--patience",
    kind=at_least(1),
    default=8,
    metavar="N",
    help="stop after N epochs without a better validation AUC (default {default})",
)
SEED: Final = Option(
    "--seed",
    kind=INTEGER,
    default=1234,
    metavar="N",
    help="seed of the patient split, the augmentation and the weights (default {default})",
)
_ANYTHING_ELSE: Final = "anything else (one line on stderr)"
_SOURCES: Final = "batchscan.ingest.sources"
CALLING_AET: Final = Option(
    "--calling-aet",
    metavar="AET",
    default=FromCode(_SOURCES, "DEFAULT_CALLING_AET"),
    help="batchscan's AE title (default {default})",
)
TLS_CA: Final = Option(
    "--tls-ca",
    kind=PATH,
    metavar="PEM",
    example="/etc/batchscan/pacs-ca.pem",
    help="DICOM TLS or HTTPS: the CA of the PACS's certificate (default: the system's CAs)",
)
TLS_CERT: Final = Option(
    "--tls-cert",
    kind=PATH,
    metavar="PEM",
    example="/etc/batchscan/batchscan-cert.pem",
    help="batchscan's own certificate, for a PACS that asks for one",
)
TLS_KEY: Final = Option(
    "--tls-key",
    kind=PATH,
    metavar="PEM",
    example="/etc/batchscan/batchscan-key.pem",
    help="DICOM TLS: its private key",
)
PACS_CREDENTIALS: Final = Option(
    "--pacs-credentials",
    kind=PATH,
    metavar="FILE",
    example="/etc/batchscan/pacs.credentials",
    help="a file of one line, user:password (HTTP basic; DICOM user identity) or Bearer "
    "TOKEN, for a PACS that asks for credentials (readable by the job's user only; never "
    "logged)",
)

SCAN: Final = Command(
    "scan",
    "score an archive folder or a PACS",
    (
        Option(
            "ARCHIVE_DIR",
            dest="archive",
            kind=ARCHIVE,
            required=True,
            example="/mnt/pacs-export",
            help="the archive folder, or a PACS: http(s)://HOST/…/dicom-web (DICOMweb) or "
            "dicom://AET@HOST:PORT (C-FIND, C-GET); only read; required here or in --config",
        ),
        Option(
            "--out",
            kind=PATH,
            metavar="REPORT_DIR",
            required=True,
            example="/var/lib/batchscan/reports",
            help="where reports go (required)",
        ),
        CONFIG,
        Option(
            "--state",
            kind=PATH,
            metavar="PATH",
            example="/var/lib/batchscan/state.sqlite",
            help="incremental state database (default: REPORT_DIR/state.sqlite)",
        ),
        PSEUDONYM_KEY_FILE,
        Option(
            "--model",
            kind=PATH,
            metavar="PATH",
            example="/opt/batchscan/models/site_cnn.keras",
            help="a .keras model with its .json card (default: the bundled model)",
        ),
        Option(
            "--batch-size",
            kind=at_least(1),
            default=_scan_default("batch_size"),
            metavar="N",
            help="images per inference batch (default {default}; larger on a GPU)",
        ),
        WORKERS,
        Option(
            "--engine",
            choices=("local", "ray"),
            default=_scan_default("engine"),
            help="local: this machine; ray: a Ray cluster (pip install 'batchscan[ray]')",
        ),
        Option(
            "--ray-address",
            metavar="ADDR",
            example="ray://head:10001",
            help="Ray cluster to join (e.g. ray://head:10001); default: a local Ray instance",
        ),
        NO_PROGRESS,
        Option(
            "--all-modalities",
            kind=FLAG,
            help="score every single-frame grayscale image, not only chest radiographs",
        ),
        Option(
            "--max-pixel-bytes",
            kind=at_least(1),
            default=_scan_default("max_pixel_bytes"),
            metavar="N",
            help="refuse images declaring more pixel data than this (default {default})",
        ),
        Option(
            "--full-resolution",
            kind=FLAG,
            help="decode every image at full resolution (slower; default: decode only what "
            "the 64 x 64 model input needs)",
        ),
        Option(
            "--file-timeout",
            kind=SECONDS,
            default=_scan_default("file_timeout"),
            metavar="SECONDS",
            help="seconds one file may take in a decode process before it fails as timeout "
            "(default {default})",
        ),
        Option(
            "--precision",
            choices=("auto", "float32", "mixed"),
            default=_scan_default("precision"),
            help="inference precision (auto: mixed on a GPU, float32 on a CPU)",
        ),
        Option("--no-xla", kind=FLAG, help="do not XLA-compile inference"),
        Option(
            "--out-of-domain",
            choices=("score", "skip"),
            default=_scan_default("out_of_domain"),
            help="images outside the model card's training domain (age, view, modality): "
            "score them and mark them in_domain=false (default), or skip them as "
            "out_of_domain:<why>",
        ),
        Option(
            "--sr-out",
            kind=PATH,
            metavar="DIR",
            example="/var/lib/batchscan/sr-outbox",
            help="also write one DICOM SR per scored study to this outbox folder (outside the "
            "archive; each SR carries the patient's identity), for batchscan send",
        ),
        Option(
            "--shadow-model",
            kind=PATH,
            metavar="PATH",
            example="/opt/batchscan/models/site_2026/site_cnn.keras",
            help="also score every image with this second model, on the same inputs (from "
            "the input store where it has them), reported as shadow_score beside the score "
            "of the model in use; batchscan evaluate compares the two",
        ),
        REPORTS_FILE,
        Option(
            "--monitor-period",
            choices=("day", "week", "month"),
            default=_scan_default("monitor_period"),
            help="the periods of performance.parquet and drift.parquet: days, ISO weeks (from "
            "Monday) or months of study date (default {default})",
        ),
        Option(
            "--drift-reference",
            kind=DATES,
            metavar="FROM..TO",
            example="2026-01-05..2026-02-01",
            help="the studies dated FROM..TO (two dates, both inside) as the reference of the "
            "drift monitor and of the disagreement alarm; default: the first {days} days with "
            "enough studies for day periods (four of each weekday; a day is compared with "
            "those of its weekday), the first {periods} weeks or months for the others",
            quotes={
                "days": FromCode(_MONITORING, "REFERENCE_PERIODS.day"),
                "periods": FromCode(_MONITORING, "REFERENCE_PERIODS.week"),
            },
        ),
        PACS_CREDENTIALS,
        replace(CALLING_AET, help="a DIMSE PACS: batchscan's AE title (default {default})"),
        TLS_CA,
        TLS_CERT,
        TLS_KEY,
        Option(
            "--since",
            kind=DATE,
            metavar="DATE",
            no_config="a backfill's window is given for one run, not kept for every night",
            help="a PACS: ask for studies dated from DATE (YYYY-MM-DD; a backfill); default: "
            "from the last run's high-water mark less --late-margin-days",
        ),
        Option(
            "--until",
            kind=DATE,
            metavar="DATE",
            no_config="a backfill's window is given for one run, not kept for every night",
            help="a PACS: ask for studies dated up to DATE (YYYY-MM-DD); default: no end",
        ),
        Option(
            "--late-margin-days",
            kind=at_least(0),
            default=FromCode(_SOURCES, "DEFAULT_LATE_MARGIN_DAYS"),
            metavar="N",
            help="a PACS: a nightly run asks again for the N days before the last run's "
            "high-water mark, for studies that reach the PACS late (default {default})",
        ),
        Option(
            "--pacs-connections",
            kind=at_least(1),
            default=FromCode(_SOURCES, "DEFAULT_CONNECTIONS"),
            metavar="N",
            help="a PACS: connections at once, each held by one decode process, which "
            "fetches the next instance while it decodes one (default {default})",
        ),
        Option(
            "--pacs-timeout",
            kind=SECONDS,
            default=FromCode(_SOURCES, "ANSWER_TIMEOUT"),
            metavar="SECONDS",
            help="a PACS: seconds to wait for each answer; a PACS that then does not answer "
            "a probe either stops the run (default {default})",
        ),
    ),
    {
        EXIT_OK: "the run finished (files that failed are listed in the report, not fatal)",
        EXIT_ERROR: "anything else, a PACS that went down or stopped answering during the run "
        "(what was scored is kept), and a run that published its reports but could not use "
        "its --reports-file",
        EXIT_USAGE: "bad arguments or configuration, ARCHIVE_DIR missing or unreadable, a "
        "PACS URL, credentials or TLS file that cannot be used, a "
        "model without a valid card, an --sr-out inside the archive or not writable, a "
        "missing --reports-file",
        EXIT_LOCKED: "another run holds REPORT_DIR (it is locked)",
    },
)

EVALUATE: Final = Command(
    "evaluate",
    "measure the scores of a finished scan against the site's labels",
    (
        Option(
            "REPORT_DIR", dest="report_dir", kind=PATH, help="the --out folder of a finished scan"
        ),
        Option(
            "--labels",
            kind=PATH,
            required=True,
            metavar="LABELS.csv",
            help="CSV with accession_number or study_instance_uid, and label (0/1, "
            "normal/pneumonia or uncertain), e.g. from batchscan labels",
        ),
        UNCERTAIN,
        Option(
            "--out",
            kind=PATH,
            metavar="DIR",
            help="where evaluation.json and evaluation.html go (default: REPORT_DIR)",
        ),
        Option(
            "--target-sensitivity",
            kind=NUMBER,
            default=FromCode("batchscan.site.evaluate", "DEFAULT_TARGET_SENSITIVITY"),
            metavar="S",
            help="also report the threshold reaching this sensitivity (default {default})",
        ),
    ),
    {
        EXIT_OK: "evaluation.json and evaluation.html written",
        EXIT_ERROR: "anything else, e.g. an output that cannot be written",
        EXIT_USAGE: "bad arguments, a labels file that cannot be used, or REPORT_DIR without "
        "a finished scan",
    },
)

TRAIN: Final = Command(
    "train",
    "fine-tune (or retrain) the model on the site's labelled archive",
    (
        Option("ARCHIVE_DIR", dest="archive", kind=PATH, help="the site's archive (only read)"),
        Option(
            "--labels",
            kind=PATH,
            required=True,
            metavar="LABELS.csv",
            help="labels of the archive's studies, as for evaluate (e.g. from batchscan labels)",
        ),
        UNCERTAIN,
        Option(
            "--out",
            kind=PATH,
            required=True,
            metavar="MODEL_DIR",
            help="where the model, its card, OOD statistics and input cache go",
        ),
        NAME,
        Option(
            "--from-scan",
            kind=PATH,
            metavar="REPORT_DIR",
            help="a scan of this archive: the files it scored take their model inputs from "
            "its input store (read-only) instead of being read again; only the others are "
            "read",
        ),
        Option(
            "--base",
            kind=PATH,
            metavar="MODEL",
            help="model to fine-tune (default: the bundled)",
        ),
        Option("--from-scratch", kind=FLAG, help="train the seed architecture anew"),
        Option(
            "--epochs",
            kind=at_least(1),
            metavar="N",
            quotes={
                "fine_tune": FromCode(_SITE_TRAINING, "FINE_TUNE_EPOCHS"),
                "scratch": FromCode("batchscan.site.training", "TrainConfig.epochs"),
            },
            help="most epochs (default {fine_tune} fine-tuning, {scratch} from scratch; early "
            "stopping may end sooner)",
        ),
        Option(
            "--batch-size",
            kind=at_least(1),
            default=64,
            metavar="N",
            help="training batch size (default {default})",
        ),
        Option(
            "--learning-rate",
            kind=NUMBER,
            metavar="LR",
            quotes={
                "fine_tune": FromCode(_SITE_TRAINING, "FINE_TUNE_LEARNING_RATE"),
                "scratch": FromCode("batchscan.site.training", "TrainConfig.learning_rate"),
            },
            help="Adam learning rate (default {fine_tune:g} fine-tuning, {scratch:g} from "
            "scratch: the shipped model's)",
        ),
        PATIENCE,
        SEED,
        WORKERS,
        NO_PROGRESS,
        Option("--no-augment", kind=FLAG, help="train without the radiograph augmentation"),
        BALANCE,
        Option(
            "--cache",
            kind=PATH,
            metavar="PATH",
            help="model-input cache file (default MODEL_DIR/<name>.inputs.npz)",
        ),
        replace(
            PSEUDONYM_KEY_FILE,
            help="key of the pseudonymised patient key that the split groups by (also "
            f"{PSEUDONYM_KEY_ENV}); without one, an HMAC of PatientID kept in memory",
        ),
    ),
    {
        EXIT_OK: "the model, its card and its OOD statistics written",
        EXIT_ERROR: _ANYTHING_ELSE,
        EXIT_USAGE: "bad arguments, labels or pseudonym key that cannot be used, too few "
        "labelled studies, a base model without a valid card, --out inside the archive",
    },
)

LABELS: Final = Command(
    "labels",
    "label studies pneumonia/normal/uncertain from their radiology reports",
    (
        Option(
            "REPORTS",
            dest="reports",
            kind=PATH,
            help="CSV (header line; quoted multi-line text) or JSON Lines (.jsonl) of reports, "
            "UTF-8",
        ),
        Option(
            "--out",
            kind=PATH,
            required=True,
            metavar="LABELS.csv",
            help="labels file to write: key, label, reason (one row per report)",
        ),
        Option(
            "--audit",
            kind=PATH,
            metavar="AUDIT.csv",
            help="also write the sentences that decided each label, for a person to check "
            "(holds report text: keep it where the reports are kept)",
        ),
        Option(
            "--key",
            choices=("accession_number", "study_instance_uid"),
            default="accession_number",
            help="the column that names the study (default {default})",
        ),
        Option(
            "--text-column",
            default="report",
            metavar="NAME",
            help="the column (or JSON field) with the report text (default {default})",
        ),
        Option(
            "--airspace",
            choices=("pneumonia", "uncertain"),
            default="pneumonia",
            help="an airspace finding (consolidation, infiltrate, airspace disease) asserted "
            "without a pneumonia word: pneumonia (default) or uncertain",
        ),
        replace(NO_PROGRESS, help="no progress bar"),
    ),
    {
        EXIT_OK: "the labels (and the audit) written",
        EXIT_ERROR: "anything else, e.g. the labels cannot be written",
        EXIT_USAGE: "bad arguments, or a reports file that cannot be used (missing, "
        "malformed: the line is named)",
    },
)

REPORT: Final = Command(
    "report",
    "make REPORT_DIR/report.html again from the state, without scanning",
    (Option("REPORT_DIR", dest="report_dir", kind=PATH, help="the --out folder of a scan"),),
    {
        EXIT_OK: "report.html written",
        EXIT_ERROR: _ANYTHING_ELSE,
        EXIT_USAGE: "bad arguments, or REPORT_DIR holds no scan's state",
        EXIT_LOCKED: "a scan holds REPORT_DIR (it is locked)",
    },
)

SEND: Final = Command(
    "send",
    "send the SRs of an outbox that a PACS has not acknowledged (C-STORE or STOW-RS)",
    (
        Option(
            "OUTBOX",
            dest="outbox",
            kind=PATH,
            required=True,
            config="sr_out",
            help="the --sr-out folder of scans (required here or as sr_out in --config)",
        ),
        Option(
            "--to",
            dest="send_to",
            metavar="AET@HOST:PORT",
            example="PACS@pacs.hospital.local:104",
            help="the PACS's Storage SCP (C-STORE); this or --stow (or both) is required, "
            "here or in --config",
        ),
        Option(
            "--stow",
            dest="send_stow",
            metavar="URL",
            example="https://pacs.hospital.local/dicom-web",
            help="the PACS's DICOMweb base, https://HOST/…/dicom-web: send by STOW-RS (with "
            "--to as well: to both, each with its own deliveries in the ledger)",
        ),
        CALLING_AET,
        CONFIG,
        TLS_CA,
        TLS_CERT,
        TLS_KEY,
        PACS_CREDENTIALS,
    ),
    {
        EXIT_OK: "all delivered (or nothing to send)",
        EXIT_ERROR: "some left (PACS down, refused, an SR file missing or unreadable)",
        EXIT_USAGE: "bad arguments or configuration, or a folder that is no SR outbox",
    },
    any_of=(("--to", "--stow"),),
)

ADAPT: Final = Command(
    "adapt",
    "from a scan and its radiology reports: train a site model on the studies up to a date, "
    "measure it against the model in use on the later ones, and say whether to deploy it",
    (
        Option(
            "REPORT_DIR",
            dest="report_dir",
            kind=PATH,
            help="the --out folder of a scan (with --reports-file, so that its labels are there)",
        ),
        Option(
            "--until",
            kind=DATE,
            required=True,
            metavar="DATE",
            help="last study date (YYYY-MM-DD) of the training period; later studies are "
            "measured, never learned from",
        ),
        Option(
            "--out",
            kind=PATH,
            required=True,
            metavar="MODEL_DIR",
            help="where the model, its card, adaptation.json and adaptation.html go",
        ),
        replace(
            REPORTS_FILE,
            help="a RIS export (file or folder): its new or changed reports are labelled too",
        ),
        NAME,
        Option(
            "--base",
            kind=PATH,
            metavar="MODEL",
            help="model to start from (default: the model the scan used, the model in use)",
        ),
        Option(
            "--pretrain",
            kind=FLAG,
            help="first learn from every scored film of the training period, labelled or not "
            "(SimCLR-style self-supervised pretraining on the input store)",
        ),
        Option(
            "--pretrain-views",
            kind=at_least(256),
            metavar="N",
            quotes={"views": FromCode("batchscan.site.pretrain", "DEFAULT_VIEWS")},
            help="pairs of augmented views that pretraining sees (default {views})",
        ),
        replace(
            BALANCE,
            help="view: weight examples so that every view carries the same class balance; "
            "none (default): class weighting only",
        ),
        Option(
            "--epochs",
            kind=at_least(1),
            metavar="N",
            quotes={"fine_tune": FromCode(_SITE_TRAINING, "FINE_TUNE_EPOCHS")},
            help="most fine-tuning epochs (default {fine_tune}; early stopping on validation AUC)",
        ),
        PATIENCE,
        SEED,
        replace(
            WORKERS, help="decode processes for files the input store lacks (default: {default})"
        ),
        NO_PROGRESS,
    ),
    {
        EXIT_OK: "the site model, adaptation.json and adaptation.html written, with the "
        "verdict printed (deploy or not)",
        EXIT_ERROR: _ANYTHING_ELSE,
        EXIT_USAGE: "bad arguments, REPORT_DIR or the reports file missing, too few labelled "
        "studies, a model without a valid card",
    },
)

DEMO: Final = Command(
    "demo",
    "write a small synthetic demo archive",
    (
        Option(
            "DIR",
            dest="directory",
            kind=PATH,
            help="folder to create (must not hold files)",
        ),
        Option(
            "--size",
            kind=at_least(1),
            default=1024,
            help="image side in pixels (default {default})",
        ),
        Option(
            "--studies",
            kind=at_least(1),
            default=6,
            metavar="N",
            help="studies with a frontal and a lateral image (default {default})",
        ),
    ),
    {
        EXIT_OK: "the demo archive written",
        EXIT_ERROR: _ANYTHING_ELSE,
        EXIT_USAGE: "bad arguments, or DIR holds files",
    },
)

#: Every subcommand, in the order ``batchscan --help`` lists them.
COMMANDS: Final = (SCAN, EVALUATE, TRAIN, LABELS, REPORT, SEND, ADAPT, DEMO)
BY_NAME: Final = {c.name: c for c in COMMANDS}

#: The options of ``batchscan`` itself (before a subcommand).
PROGRAM: Final = Command(
    "batchscan",
    "Score the chest radiographs of a DICOM archive with a pneumonia CNN and write "
    "Parquet/CSV reports.",
    (
        Option("--version", kind=VERSION, help="print batchscan's version and exit"),
        Option(
            "--verbose",
            kind=FLAG,
            help="with --version: also Python's and each score package's version (what "
            "manifest.json and runs.parquet record) and the device the model would run on",
        ),
    ),
    {EXIT_OK: "the version or the help printed", EXIT_USAGE: "no or an unknown subcommand"},
)


def command_in(argv: Iterable[str]) -> tuple[str, ...]:
    """The subcommand that `argv` names (first word not an option: ``batchscan`` itself takes
    no option with a value), as a tuple of none or one; a parser is made for it only."""
    for word in argv:
        if not word.startswith("-"):
            return (word,) if word in BY_NAME else ()
    return ()


def config_keys() -> dict[str, Option]:
    """Every key the config file may hold: those of the options of every command that reads
    ``--config`` (a file read by ``scan`` and ``send`` holds the keys of both)."""
    keys: dict[str, Option] = {}
    for command in COMMANDS:
        if command.reads_config:
            for option in command.options:
                if option.key is not None:
                    keys.setdefault(option.key, option)
    return keys


def describe(command: Command, option: Option) -> str:
    """One line of the contract (``tests/contract/interface.toml``) for `option`: its kind or
    choices, default, whether required, config key and environment variable."""
    what = "|".join(option.choices) if option.choices else option.kind.name
    parts = [what]
    if (default := option.shown_default()) is not None:
        parts.append(f"default {default}")
    if option.required:
        parts.append("required here or in --config" if command.reads_config else "required")
    line = ", ".join(parts)
    if command.reads_config:
        line += f"; config {option.key}" if option.key else "; not in the config file"
    if option.env:
        line += f"; env {option.env}"
    return line


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def example_config(primary: Command = SCAN) -> str:
    """``jobs/deploy/cron/batchscan.example.toml``: every key of the config file with its help,
    commented out with its default (or an example), except those `primary` requires."""
    lines = [
        "# batchscan's config file, read by `batchscan scan --config FILE` and `batchscan send",
        "# --config FILE`: each takes its own keys and leaves the others; a key that no command",
        "# knows, or a bad value, is refused (exit 2). A key is the long option with _ for -",
        "# (each entry names its option); the command line wins over this file; relative paths",
        "# are relative to this file's folder.",
        "# Made from batchscan/options.py, do not edit by hand:",
        f"#   python -m batchscan.options > {EXAMPLE_CONFIG}",
    ]
    by_key: dict[str, list[str]] = {}
    for command in COMMANDS:
        for option in command.options if command.reads_config else ():
            if option.key is not None:
                by_key.setdefault(option.key, []).append(command.name)
    for key, option in config_keys().items():
        value = option.example if option.example is not None else option.default_value()
        if option.kind is FLAG:
            value = False
        wanted = option.required and key in {o.key for o in primary.options}
        about = f"{option.usage_name} ({', '.join(by_key[key])}): {option.help_text()}"
        lines += ["", *textwrap.wrap(about, 96, initial_indent="# ", subsequent_indent="#   ")]
        lines.append(f"{'' if wanted else '# '}{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(example_config())
