"""The ``batchscan`` command line (thin: parsing, exit codes, messages).

Every option and exit code is declared once, in :mod:`batchscan.options`; the parser is made
from that table, and ``docs/cli.md`` and ``tests/contract/interface.toml`` say the same.
Exit status: 0 done; 2 bad arguments or configuration (and each command's own usage errors);
3 another run holds REPORT_DIR; 1 anything else. Errors are one line on stderr, because cron
mails what a job prints.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from batchscan import __version__, options
from batchscan.config import ConfigError, load_config, pseudonym_key
from batchscan.options import EXIT_ERROR, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, Option
from batchscan.storage.files import PRIVATE_UMASK

_R = TypeVar("_R")

__all__ = ["EXIT_ERROR", "EXIT_LOCKED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"batchscan: error: {message}\n")


def build_parser(
    config: dict[str, Any] | None = None, commands: Iterable[str] | None = None
) -> argparse.ArgumentParser:
    """The argument parser, made from :data:`batchscan.options.COMMANDS`.

    `config` (a file read by :func:`~batchscan.config.load_config`) replaces the defaults of
    the commands that read ``--config``, so that options on the command line win over the
    file. `commands`: the subcommands whose options are added (default all); the others are
    listed only, so that ``batchscan scan`` reads no default of the trainer.
    """
    parser = _Parser(prog="batchscan", description=options.PROGRAM.help)
    for option in options.PROGRAM.options:
        _add(parser, option, configurable=False)
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    wanted = None if commands is None else set(commands)
    for command in options.COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help)
        if wanted is None or command.name in wanted:
            for option in command.options:
                _add(sub, option, configurable=command.reads_config)
            sub.set_defaults(**command.defaults_from(config or {}))
    return parser


def _add(parser: argparse.ArgumentParser, option: Option, configurable: bool) -> None:
    """Add one declared option; a required one that the config file may give is checked after
    the file is read (:meth:`batchscan.options.Command.missing`), not by argparse."""
    text = option.help_text().replace("%", "%%")
    if option.kind is options.VERSION:
        parser.add_argument(
            option.name, action="version", version=f"batchscan {__version__}", help=text
        )
    elif option.kind is options.FLAG:
        parser.add_argument(option.name, action="store_true", help=text)
    elif option.positional:
        parser.add_argument(
            option.dest,
            type=option.kind.parse,
            metavar=option.name,
            nargs="?" if configurable else None,
            help=text,
        )
    else:
        parser.add_argument(
            option.name,
            dest=option.dest,
            type=option.kind.parse,
            choices=option.choices or None,
            default=option.default_value(),
            metavar=option.metavar,
            required=option.required and not configurable,
            help=text,
        )


def _request(request: type[_R], args: argparse.Namespace, **given: Any) -> _R:
    """The dataclass `request` made from the options whose dest is one of its fields (so that
    an option named like the field it fills needs no line here) and from `given`, which wins
    (values that are not an option's as it is)."""
    same = {f.name: getattr(args, f.name) for f in fields(request) if hasattr(args, f.name)}
    return request(**{**same, **given})


def _failed(message: object, status: int = EXIT_USAGE) -> int:
    print(f"batchscan: error: {message}", file=sys.stderr)
    return status


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _quiet_tensorflow() -> None:
    """Training calls predict on arrays of several sizes, and TensorFlow logs a retracing
    warning for each: noise in a cron mail, not a problem."""
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def _locked(exc: Exception) -> int:
    print(f"batchscan: {exc}", file=sys.stderr)
    return EXIT_LOCKED


def _scan(args: argparse.Namespace) -> int:
    from batchscan.engines.pipeline import ScanConfig
    from batchscan.ingest.decoders import DEFAULT_MIN_EDGE
    from batchscan.ingest.sources import PacsArchive, PacsUnavailableError
    from batchscan.results.runlock import LockHeldError
    from batchscan.scan import UsageError, run_scan

    try:
        key = pseudonym_key(args.pseudonym_key_file)
    except ConfigError as exc:
        return _failed(exc)
    archive = args.archive
    if isinstance(archive, str):  # a PACS URL: its options fill a PacsArchive by name
        archive = _request(PacsArchive, args, url=archive)
    elif args.since is not None or args.until is not None:
        return _failed(
            "--since and --until ask a PACS for a window of dates; ARCHIVE_DIR is a folder"
        )
    config = _request(
        ScanConfig,
        args,
        archive=archive,
        model_path=args.model,
        progress=_progress(args),
        jit_compile=not args.no_xla,
        min_edge=None if args.full_resolution else DEFAULT_MIN_EDGE,
        pseudonym_key=key,
    )
    try:
        result = run_scan(config)
    except UsageError as exc:
        return _failed(exc)
    except LockHeldError as exc:
        return _locked(exc)
    except PacsUnavailableError as exc:  # one line naming the PACS; what was scored is kept
        return _failed(exc, EXIT_ERROR)
    print(result.summary)
    for line in result.warnings:
        print(line)
    for line in result.problems:
        print(f"batchscan: error: {line}", file=sys.stderr)
    return EXIT_ERROR if result.problems else EXIT_OK


def _send(args: argparse.Namespace) -> int:
    from batchscan.pacs.outbox import OutboxError
    from batchscan.pacs.send import (
        Destination,
        DestinationError,
        SendError,
        TlsOptions,
        send_outbox,
        send_stow,
    )

    tls_files = (args.tls_ca, args.tls_cert, args.tls_key)
    tls = TlsOptions(*tls_files) if any(f is not None for f in tls_files) else None
    sends: list[Callable[[], Any]] = []  # C-STORE, STOW-RS or both (each its own ledger)
    try:
        if args.send_to is not None:
            destination = Destination.parse(args.send_to)
            sends.append(lambda: send_outbox(args.outbox, destination, args.calling_aet, tls,
                                             credentials=args.pacs_credentials))  # fmt: skip
        if args.send_stow is not None:
            sends.append(lambda: send_stow(args.outbox, args.send_stow, args.pacs_credentials, tls))
        for send in sends:
            print(send().summary())
    except (DestinationError, OutboxError) as exc:
        return _failed(exc)
    except SendError as exc:
        return _failed(exc, EXIT_ERROR)
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    from batchscan.site.evaluate import (
        EvaluationError,
        LabelsError,
        evaluate,
        explain_errors,
        read_labels,
        summary,
        write_evaluation,
    )

    try:
        labels = read_labels(args.labels, args.uncertain)
        result = evaluate(args.report_dir, labels, args.target_sensitivity)
        written = write_evaluation(
            result, args.out or args.report_dir, explain_errors(args.report_dir, result)
        )
    except (LabelsError, EvaluationError) as exc:
        return _failed(exc)
    except OSError as exc:  # not a bad argument: the disk or the folder's permissions
        return _failed(f"cannot write the evaluation: {exc}", EXIT_ERROR)
    print(summary(result))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from batchscan.scoring.model import ModelError
    from batchscan.site.evaluate import LabelsError, read_labels
    from batchscan.site.site_training import TrainingError, TrainRequest, run_training

    _quiet_tensorflow()

    try:
        if not args.archive.is_dir():
            raise TrainingError(f"archive folder not found: {args.archive}")
        out = args.out.resolve()
        if out == args.archive.resolve() or args.archive.resolve() in out.parents:
            raise TrainingError(f"--out {args.out} is inside the archive; it is never written")
        request = _request(
            TrainRequest,
            args,
            labels_path=args.labels,
            labels=read_labels(args.labels, args.uncertain),
            pseudonym_key=pseudonym_key(args.pseudonym_key_file),
            progress=_progress(args),
            augment=not args.no_augment,
            balance=None if args.balance == "none" else args.balance,
        )
        card = run_training(request)
    except (LabelsError, TrainingError, ModelError, ConfigError) as exc:
        return _failed(exc)
    m = card["metrics"]
    print(
        f"batchscan train: wrote {args.out / card['model_file']} ({card['mode']}, "
        f"{card['training_data']['splits']['train']['studies']} training studies; model "
        f"inputs cache {card['_run']['cache']}); val AUC {m['val_auc']:.3f}; local test AUC "
        f"{m['test_auc']:.3f} (95 % CI {m['test_auc_ci95'][0]:.3f}-{m['test_auc_ci95'][1]:.3f}"
        f"), sensitivity {m['test_sensitivity']:.3f}, specificity "
        f"{m['test_specificity']:.3f} at threshold {card['threshold']:.3f}"
    )
    views = card["test_by_view"]
    print(
        "local test AUC by view: "
        + "; ".join(
            f"{view} n={v['n']} AUC {'n/a' if v['auc'] is None else format(v['auc'], '.3f')}"
            for view, v in views["views"].items()
        )
        + "; within views (pooled) "
        + ("n/a" if views["within_view_auc"] is None else f"{views['within_view_auc']:.3f}")
        + (f"; examples balanced by {card['balance']['by']}" if card["balance"]["by"] else "")
    )
    return EXIT_OK


def _adapt(args: argparse.Namespace) -> int:
    from batchscan.scoring.model import ModelError
    from batchscan.site.adapt import AdaptError, AdaptRequest, run_adaptation, summary

    _quiet_tensorflow()

    try:
        if not args.report_dir.is_dir():
            raise AdaptError(f"REPORT_DIR not found: {args.report_dir}")
        if args.reports_file is not None and not args.reports_file.exists():
            raise AdaptError(f"reports file not found: {args.reports_file}")
        request = _request(
            AdaptRequest,
            args,
            progress=_progress(args),
            balance=None if args.balance == "none" else args.balance,
        )
        done = run_adaptation(request)
    except (AdaptError, ModelError) as exc:
        return _failed(exc)
    print(summary(done.result))
    print(f"wrote {', '.join(str(p) for p in done.written)}")
    print(done.line)
    return EXIT_OK


def _labels(args: argparse.Namespace) -> int:
    from batchscan.site.report_labels import ReportsError, run_labels

    try:
        run = run_labels(
            args.reports,
            args.out,
            audit=args.audit,
            key=args.key,
            text_column=args.text_column,
            airspace=args.airspace,
            progress=_progress(args),
        )
    except ReportsError as exc:
        return _failed(exc)
    except OSError as exc:  # not a bad argument: the disk or the folder's permissions
        return _failed(f"cannot write the labels: {exc}", EXIT_ERROR)
    print(run.summary())
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from batchscan.results.report_html import ReportError, regenerate
    from batchscan.results.runlock import LockHeldError

    try:
        written = regenerate(args.report_dir)
    except ReportError as exc:
        return _failed(exc)
    except LockHeldError as exc:
        return _locked(exc)
    print(f"wrote {written}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from batchscan.synth import write_demo_archive

    target: Path = args.directory
    if target.exists() and any(target.iterdir()):
        return _failed(f"{target} exists and is not empty")
    written = write_demo_archive(target, size=args.size, studies=args.studies)
    print(f"wrote a demo archive of {len(written)} files to {target}")
    return EXIT_OK


def _verbose_version(argv: list[str]) -> bool:
    """``batchscan --version --verbose``: the release, then Python's and each score package's
    version (:func:`batchscan.versions`, what manifest.json and runs.parquet record) and the
    device the model would run on, one ``name version`` per line. True when it printed."""
    if sorted(argv) != ["--verbose", "--version"]:
        return False
    from batchscan import versions
    from batchscan.scoring.infer import device_description

    print(f"batchscan {__version__}")
    for name, found in versions().items():
        print(f"{name} {found or 'not installed'}")
    print(f"device {device_description()}")
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``batchscan`` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("batchscan").setLevel(logging.INFO)
    # reports, state, labels, models: readable by owner and group only (a stricter umask wins)
    os.umask(os.umask(0) | PRIVATE_UMASK)
    argv = sys.argv[1:] if argv is None else argv
    if _verbose_version(argv):
        return EXIT_OK
    named = options.command_in(argv)
    args = build_parser(commands=named).parse_args(argv)
    if getattr(args, "config", None) is not None:
        try:
            args = build_parser(load_config(args.config), named).parse_args(argv)
        except ConfigError as exc:
            return _failed(exc)
    command = options.BY_NAME[args.command]
    if (missing := command.missing(args)) is not None:
        return _failed(missing)
    try:
        return _RUN[command.name](args)
    except KeyboardInterrupt:
        print("batchscan: interrupted; previous reports left as they were", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # exit 1 with one line; the traceback is no use in cron mail
        print(f"batchscan: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


#: What each subcommand runs (``tests/test_options.py`` holds their exit codes to the table).
_RUN: dict[str, Callable[[argparse.Namespace], int]] = {
    "scan": _scan,
    "evaluate": _evaluate,
    "train": _train,
    "labels": _labels,
    "report": _report,
    "send": _send,
    "adapt": _adapt,
    "demo": _demo,
}


if __name__ == "__main__":
    raise SystemExit(main())
