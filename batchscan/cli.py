"""The ``batchscan`` command line (thin: parsing, exit codes, messages).

Exit status (docs/interface.md): 0 the run finished; 2 bad arguments or configuration, or
ARCHIVE_DIR missing or unreadable; 3 another run holds REPORT_DIR; 1 anything else.
Errors are one line on stderr, because cron mails what a job prints.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from batchscan import __version__
from batchscan.config import ConfigError, int_at_least, load_config, pseudonym_key, seconds
from batchscan.storage.files import PRIVATE_UMASK

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"batchscan: error: {message}\n")


def build_parser(config: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The argument parser of every subcommand; `config` (from ``--config``) replaces the
    defaults of ``scan``, so that options on the command line win over the file."""
    from batchscan.engines.pipeline import default_workers
    from batchscan.engines.workers import DEFAULT_FILE_TIMEOUT
    from batchscan.ingest.header import DEFAULT_MAX_PIXEL_BYTES

    parser = _Parser(
        prog="batchscan",
        description="Score the chest radiographs of a DICOM "
        "archive with a pneumonia CNN and write Parquet/CSV reports.",
    )
    parser.add_argument("--version", action="version", version=f"batchscan {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    scan = commands.add_parser("scan", help="score an archive folder")
    scan.add_argument(
        "archive",
        type=Path,
        metavar="ARCHIVE_DIR",
        nargs="?",
        help="the archive folder (only read; required here or in --config)",
    )
    scan.add_argument("--out", type=Path, metavar="REPORT_DIR", help="where reports go (required)")
    scan.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="TOML file with any of these options (long names, e.g. batch_size = 512); "
        "options on the command line win",
    )
    scan.add_argument(
        "--state",
        type=Path,
        metavar="PATH",
        help="incremental state database (default: REPORT_DIR/state.sqlite)",
    )
    scan.add_argument(
        "--pseudonym-key-file",
        type=Path,
        metavar="PATH",
        help="key for the patient_key column (HMAC-SHA256 of PatientID); also "
        "BATCHSCAN_PSEUDONYM_KEY; without a key there is no patient_key column",
    )
    scan.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="PATH",
        help="a .keras model with its .json card (default: the bundled model)",
    )
    scan.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=256,
        metavar="N",
        help="images per inference batch (default 256; larger on a GPU)",
    )
    scan.add_argument(
        "--workers",
        type=int_at_least(0),
        default=default_workers(),
        metavar="N",
        help="decode processes (default: all cores; 0: in-process)",
    )
    scan.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this machine; ray: a Ray cluster (pip install 'batchscan[ray]')",
    )
    scan.add_argument(
        "--ray-address",
        metavar="ADDR",
        default=None,
        help="Ray cluster to join (e.g. ray://head:10001); default: a local Ray instance",
    )
    scan.add_argument("--no-progress", action="store_true", help="no progress bars")
    scan.add_argument(
        "--all-modalities",
        action="store_true",
        help="score every single-frame grayscale image, not only chest radiographs",
    )
    scan.add_argument(
        "--max-pixel-bytes",
        type=int_at_least(1),
        default=DEFAULT_MAX_PIXEL_BYTES,
        metavar="N",
        help="refuse images declaring more pixel data than this",
    )
    scan.add_argument(
        "--full-resolution",
        action="store_true",
        help="decode every image at full resolution (slower; default: decode only what the "
        "64 x 64 model input needs)",
    )
    scan.add_argument(
        "--file-timeout",
        type=seconds,
        default=DEFAULT_FILE_TIMEOUT,
        metavar="SECONDS",
        help="seconds one file may take in a decode process before it fails as timeout",
    )
    scan.add_argument(
        "--precision",
        choices=("auto", "float32", "mixed"),
        default="auto",
        help="inference precision (auto: mixed on a GPU, float32 on a CPU)",
    )
    scan.add_argument("--no-xla", action="store_true", help="do not XLA-compile inference")
    scan.add_argument(
        "--out-of-domain",
        choices=("score", "skip"),
        default="score",
        help="images outside the model card's training domain (age, view, modality): score "
        "them and mark them in_domain=false (default), or skip them as out_of_domain:<why>",
    )
    scan.add_argument(
        "--sr-out",
        type=Path,
        metavar="DIR",
        help="also write one DICOM SR per scored study to this outbox folder (outside the "
        "archive; each SR carries the patient's identity), for batchscan send",
    )
    scan.add_argument(
        "--shadow-model",
        type=Path,
        metavar="PATH",
        help="also score every image with this second model, on the same inputs (from the "
        "input store where it has them), reported as shadow_score beside the score of the "
        "model in use; batchscan evaluate compares the two",
    )
    scan.add_argument(
        "--reports-file",
        type=Path,
        metavar="PATH",
        help="the site's RIS export of radiology reports (a file as batchscan labels reads, "
        "or a folder of them): new or changed reports are labelled and the model is "
        "measured against them per period (performance.parquet, discrepancies.parquet)",
    )
    scan.add_argument(
        "--monitor-period",
        choices=("week", "month"),
        default="month",
        help="the periods of performance.parquet: ISO weeks (from Monday) or months "
        "(default month)",
    )
    if config:
        scan.set_defaults(**config)

    evaluate = commands.add_parser(
        "evaluate", help="measure the scores of a finished scan against the site's labels"
    )
    evaluate.add_argument(
        "report_dir", type=Path, metavar="REPORT_DIR", help="the --out folder of a finished scan"
    )
    evaluate.add_argument(
        "--labels",
        type=Path,
        required=True,
        metavar="LABELS.csv",
        help="CSV with accession_number or study_instance_uid, and label (0/1, "
        "normal/pneumonia or uncertain), e.g. from batchscan labels",
    )
    _uncertain_option(evaluate)
    evaluate.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where evaluation.json and evaluation.html go (default: REPORT_DIR)",
    )
    evaluate.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.90,
        metavar="S",
        help="also report the threshold reaching this sensitivity (default 0.90)",
    )

    train = commands.add_parser(
        "train", help="fine-tune (or retrain) the model on the site's labelled archive"
    )
    train.add_argument(
        "archive", type=Path, metavar="ARCHIVE_DIR", help="the site's archive (only read)"
    )
    train.add_argument(
        "--labels",
        type=Path,
        required=True,
        metavar="LABELS.csv",
        help="labels of the archive's studies, as for evaluate (e.g. from batchscan labels)",
    )
    _uncertain_option(train)
    train.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="MODEL_DIR",
        help="where the model, its card, OOD statistics and input cache go",
    )
    train.add_argument("--name", default="site_cnn", help="model file stem (default site_cnn)")
    train.add_argument(
        "--from-scan",
        type=Path,
        metavar="REPORT_DIR",
        help="a scan of this archive: the files it scored take their model inputs from its "
        "input store (read-only) instead of being read again; only the others are read",
    )
    train.add_argument(
        "--base", type=Path, metavar="MODEL", help="model to fine-tune (default: the bundled)"
    )
    train.add_argument(
        "--from-scratch", action="store_true", help="train the seed architecture anew"
    )
    train.add_argument(
        "--epochs",
        type=int_at_least(1),
        metavar="N",
        help="most epochs (default 30 fine-tuning, 60 from scratch; early stopping may end sooner)",
    )
    train.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=64,
        metavar="N",
        help="training batch size (default 64)",
    )
    train.add_argument(
        "--learning-rate",
        type=float,
        metavar="LR",
        help="Adam learning rate (default 1e-3, the shipped model's, fine-tuning or not)",
    )
    _training_options(train, "decode processes (default: all cores; 0: in-process)")
    train.add_argument(
        "--no-augment", action="store_true", help="train without the radiograph augmentation"
    )
    train.add_argument(
        "--balance",
        choices=("none", "view"),
        default="none",
        help="view: weight examples so that every view carries the same class balance (the "
        "view can then not stand in for the lungs); none (default): class weighting only",
    )
    train.add_argument(
        "--cache",
        type=Path,
        metavar="PATH",
        help="model-input cache file (default MODEL_DIR/<name>.inputs.npz)",
    )
    train.add_argument(
        "--pseudonym-key-file",
        type=Path,
        metavar="PATH",
        help="key of the pseudonymised patient key that the split groups by (also "
        "BATCHSCAN_PSEUDONYM_KEY); without one, an HMAC of PatientID kept in memory",
    )

    labels = commands.add_parser(
        "labels", help="label studies pneumonia/normal/uncertain from their radiology reports"
    )
    labels.add_argument(
        "reports",
        type=Path,
        metavar="REPORTS",
        help="CSV (header line; quoted multi-line text) or JSON Lines (.jsonl) of reports, UTF-8",
    )
    labels.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="LABELS.csv",
        help="labels file to write: key, label, reason (one row per report)",
    )
    labels.add_argument(
        "--audit",
        type=Path,
        metavar="AUDIT.csv",
        help="also write the sentences that decided each label, for a person to check "
        "(holds report text: keep it where the reports are kept)",
    )
    labels.add_argument(
        "--key",
        choices=("accession_number", "study_instance_uid"),
        default="accession_number",
        help="the column that names the study (default accession_number)",
    )
    labels.add_argument(
        "--text-column",
        default="report",
        metavar="NAME",
        help="the column (or JSON field) with the report text (default report)",
    )
    labels.add_argument(
        "--airspace",
        choices=("pneumonia", "uncertain"),
        default="pneumonia",
        help="an airspace finding (consolidation, infiltrate, airspace disease) asserted "
        "without a pneumonia word: pneumonia (default) or uncertain",
    )
    labels.add_argument("--no-progress", action="store_true", help="no progress bar")

    report = commands.add_parser(
        "report", help="make REPORT_DIR/report.html again from the state, without scanning"
    )
    report.add_argument(
        "report_dir", type=Path, metavar="REPORT_DIR", help="the --out folder of a scan"
    )

    send = commands.add_parser(
        "send", help="send the SRs of an outbox that a PACS has not acknowledged (C-STORE)"
    )
    send.add_argument(
        "outbox",
        type=Path,
        nargs="?",
        metavar="OUTBOX",
        help="the --sr-out folder of scans (required here or as sr_out in --config)",
    )
    send.add_argument(
        "--to",
        dest="send_to",
        metavar="AET@HOST:PORT",
        help="the PACS's Storage SCP (required here or as send_to in --config)",
    )
    send.add_argument(
        "--calling-aet",
        metavar="AET",
        default="BATCHSCAN",
        help="batchscan's AE title (default BATCHSCAN)",
    )
    send.add_argument(
        "--config", type=Path, metavar="PATH", help="TOML file as for scan (sr_out, send_to, ...)"
    )
    send.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="DICOM TLS: CA of the PACS's certificate"
    )
    send.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="DICOM TLS: batchscan's certificate"
    )
    send.add_argument("--tls-key", type=Path, metavar="PEM", help="DICOM TLS: its private key")
    if config:
        send.set_defaults(
            **{k: v for k, v in config.items() if k in _SEND_KEYS},
            **({"outbox": config["sr_out"]} if "sr_out" in config else {}),
        )

    adapt = commands.add_parser(
        "adapt",
        help="from a scan and its radiology reports: train a site model on the studies up to "
        "a date, measure it against the model in use on the later ones, and say whether to "
        "deploy it",
    )
    adapt.add_argument(
        "report_dir",
        type=Path,
        metavar="REPORT_DIR",
        help="the --out folder of a scan (with --reports-file, so that its labels are there)",
    )
    adapt.add_argument(
        "--until",
        type=_iso_date,
        required=True,
        metavar="DATE",
        help="last study date (YYYY-MM-DD) of the training period; later studies are "
        "measured, never learned from",
    )
    adapt.add_argument(
        "--out", type=Path, required=True, metavar="MODEL_DIR",
        help="where the model, its card, adaptation.json and adaptation.html go",
    )  # fmt: skip
    adapt.add_argument(
        "--reports-file",
        type=Path,
        metavar="PATH",
        help="a RIS export (file or folder): its new or changed reports are labelled too",
    )
    adapt.add_argument("--name", default="site_cnn", help="model file stem (default site_cnn)")
    adapt.add_argument(
        "--base", type=Path, metavar="MODEL",
        help="model to start from (default: the model the scan used, the model in use)",
    )  # fmt: skip
    adapt.add_argument(
        "--pretrain",
        action="store_true",
        help="first learn from every scored film of the training period, labelled or not "
        "(SimSiam self-supervised pretraining on the input store)",
    )
    adapt.add_argument(
        "--pretrain-views",
        type=int_at_least(256),
        metavar="N",
        help="pairs of augmented views that pretraining sees (default 40000)",
    )
    adapt.add_argument(
        "--balance",
        choices=("none", "view"),
        default="none",
        help="view: weight examples so that every view carries the same class balance; "
        "none (default): class weighting only",
    )
    adapt.add_argument(
        "--epochs",
        type=int_at_least(1),
        metavar="N",
        help="most fine-tuning epochs (default 60; early stopping on validation AUC)",
    )
    _training_options(
        adapt, "decode processes for files the input store lacks (default: all cores)"
    )

    demo = commands.add_parser("demo", help="write a small synthetic demo archive")
    demo.add_argument(
        "directory", type=Path, metavar="DIR", help="folder to create (must not hold files)"
    )
    demo.add_argument(
        "--size", type=int_at_least(1), default=1024, help="image side in pixels (default 1024)"
    )
    demo.add_argument(
        "--studies",
        type=int_at_least(1),
        default=6,
        metavar="N",
        help="studies with a frontal and a lateral image (default 6)",
    )
    return parser


#: Config keys that ``send`` reads (beside ``sr_out``, its OUTBOX).
_SEND_KEYS = ("send_to", "calling_aet", "tls_ca", "tls_cert", "tls_key")


def _training_options(parser: argparse.ArgumentParser, workers_help: str) -> None:
    """The options ``train`` and ``adapt`` share: early stopping, the seed, the decode
    processes and the progress output."""
    from batchscan.engines.pipeline import default_workers

    parser.add_argument(
        "--patience",
        type=int_at_least(1),
        default=8,
        metavar="N",
        help="stop after N epochs without a better validation AUC (default 8)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1234,
        metavar="N",
        help="seed of the patient split, the augmentation and the weights (default 1234)",
    )
    parser.add_argument(
        "--workers", type=int_at_least(0), default=default_workers(), metavar="N",
        help=workers_help,
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _quiet_tensorflow() -> None:
    """Training calls predict on arrays of several sizes, and TensorFlow logs a retracing
    warning for each: noise in a cron mail, not a problem."""
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def _iso_date(text: str) -> Any:
    """argparse type of ``--until``: an ISO date."""
    from datetime import date

    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _uncertain_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--uncertain",
        choices=("drop", "pneumonia", "normal"),
        default="drop",
        help="labels marked uncertain: left out and counted (drop, default), or counted as "
        "pneumonia or normal",
    )


def _missing(*required: tuple[object, str]) -> bool:
    """Say (one line) which required value is given neither on the command line nor in
    --config; True when one is missing."""
    for value, name in required:
        if value is None:
            print(
                f"batchscan: error: {name} is required (on the command line or in --config)",
                file=sys.stderr,
            )
            return True
    return False


def _scan(args: argparse.Namespace) -> int:
    from batchscan.engines.pipeline import ScanConfig
    from batchscan.ingest.decoders import DEFAULT_MIN_EDGE
    from batchscan.results.runlock import LockHeldError
    from batchscan.scan import UsageError, run_scan

    if _missing((args.archive, "ARCHIVE_DIR"), (args.out, "--out REPORT_DIR")):
        return EXIT_USAGE
    try:
        key = pseudonym_key(args.pseudonym_key_file)
    except ConfigError as exc:
        print(f"batchscan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    config = ScanConfig(
        archive=args.archive,
        out=args.out,
        model_path=args.model,
        batch_size=args.batch_size,
        workers=args.workers,
        all_modalities=args.all_modalities,
        max_pixel_bytes=args.max_pixel_bytes,
        progress=not args.no_progress and sys.stderr.isatty(),
        jit_compile=not args.no_xla,
        precision=args.precision,
        file_timeout=args.file_timeout,
        min_edge=None if args.full_resolution else DEFAULT_MIN_EDGE,
        state=args.state,
        pseudonym_key=key,
        engine=args.engine,
        ray_address=args.ray_address,
        out_of_domain=args.out_of_domain,
        sr_out=args.sr_out,
        shadow_model=args.shadow_model,
        reports_file=args.reports_file,
        monitor_period=args.monitor_period,
    )
    try:
        result = run_scan(config)
    except UsageError as exc:
        print(f"batchscan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LockHeldError as exc:
        print(f"batchscan: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    print(result.summary)
    for line in result.warnings:
        print(line)
    for line in result.problems:
        print(f"batchscan: error: {line}", file=sys.stderr)
    return EXIT_ERROR if result.problems else EXIT_OK


def _send(args: argparse.Namespace) -> int:
    if _missing((args.outbox, "OUTBOX"), (args.send_to, "--to AET@HOST:PORT")):
        return EXIT_USAGE
    from batchscan.pacs.outbox import OutboxError
    from batchscan.pacs.send import (
        Destination,
        DestinationError,
        SendError,
        TlsOptions,
        send_outbox,
    )

    try:
        destination = Destination.parse(args.send_to)
        tls_files = (args.tls_ca, args.tls_cert, args.tls_key)
        tls = TlsOptions(*tls_files) if any(f is not None for f in tls_files) else None
        outcome = send_outbox(args.outbox, destination, args.calling_aet, tls)
    except (DestinationError, OutboxError) as exc:
        print(f"batchscan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SendError as exc:
        print(f"batchscan: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(outcome.summary())
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
        print(f"batchscan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"batchscan: error: cannot write the evaluation: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
        request = TrainRequest(
            archive=args.archive,
            labels_path=args.labels,
            labels=read_labels(args.labels, args.uncertain),
            out=args.out,
            name=args.name,
            base=args.base,
            from_scratch=args.from_scratch,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            patience=args.patience,
            seed=args.seed,
            workers=args.workers,
            cache=args.cache,
            from_scan=args.from_scan,
            pseudonym_key=pseudonym_key(args.pseudonym_key_file),
            progress=not args.no_progress and sys.stderr.isatty(),
            augment=not args.no_augment,
            balance=None if args.balance == "none" else args.balance,
        )
        card = run_training(request)
    except (LabelsError, TrainingError, ModelError, ConfigError) as exc:
        print(f"batchscan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
        request = AdaptRequest(
            report_dir=args.report_dir,
            until=args.until,
            out=args.out,
            reports_file=args.reports_file,
            name=args.name,
            base=args.base,
            seed=args.seed,
            workers=args.workers,
            progress=not args.no_progress and sys.stderr.isatty(),
            pretrain=args.pretrain,
            pretrain_views=args.pretrain_views,
            epochs=args.epochs,
            patience=args.patience,
            balance=None if args.balance == "none" else args.balance,
        )
        done = run_adaptation(request)
    except (AdaptError, ModelError) as exc:
        print(f"batchscan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except ReportsError as exc:
        print(f"batchscan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"batchscan: error: cannot write the labels: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(run.summary())
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from batchscan.results.report_html import ReportError, regenerate
    from batchscan.results.runlock import LockHeldError

    try:
        written = regenerate(args.report_dir)
    except ReportError as exc:
        print(f"batchscan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LockHeldError as exc:
        print(f"batchscan: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    print(f"wrote {written}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from batchscan.synth import write_demo_archive

    target: Path = args.directory
    if target.exists() and any(target.iterdir()):
        print(f"batchscan: error: {target} exists and is not empty", file=sys.stderr)
        return EXIT_USAGE
    written = write_demo_archive(target, size=args.size, studies=args.studies)
    print(f"wrote a demo archive of {len(written)} files to {target}")
    return EXIT_OK


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
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) is not None:
        try:
            args = build_parser(load_config(args.config)).parse_args(argv)
        except ConfigError as exc:
            print(f"batchscan: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        if args.command == "scan":
            return _scan(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "report":
            return _report(args)
        if args.command == "train":
            return _train(args)
        if args.command == "labels":
            return _labels(args)
        if args.command == "send":
            return _send(args)
        if args.command == "adapt":
            return _adapt(args)
        return _demo(args)
    except KeyboardInterrupt:
        print("batchscan: interrupted; previous reports left as they were", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # exit 1 with one line; the traceback is no use in cron mail
        print(f"batchscan: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
