"""The scan job: one run of ``batchscan scan`` from a :class:`ScanConfig` to published reports.

Order of a run: refuse bad input (:class:`UsageError`, exit 2) -> lock REPORT_DIR
(:class:`~batchscan.runlock.LockHeldError`, exit 3) -> load the model with its card -> stream
the archive through the engine -> aggregate studies -> write every report to a temporary
file -> publish them all with atomic renames. If anything fails before the end, the
temporary files are removed and the previous reports stay as they were.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchscan.aggregate import aggregate_studies
from batchscan.model import LoadedModel, ModelError, load_model
from batchscan.pipeline import RunStats, ScanConfig, manifest_for, new_run_id, run_local
from batchscan.records import FAILED, SCORED, SKIPPED
from batchscan.report import (
    ImagesWriter,
    publish,
    read_images,
    remove_temporaries,
    study_table,
    write_manifest,
    write_studies,
)
from batchscan.runlock import report_dir_lock

log = logging.getLogger("batchscan")

#: Seconds between progress log lines when stderr is not a terminal (cron).
LOG_EVERY_SECONDS = 60.0


class UsageError(ValueError):
    """Bad arguments or configuration (exit status 2)."""


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What a finished run reports back to the command line."""

    manifest: dict[str, Any]
    summary: str


def check_config(config: ScanConfig) -> None:
    """Refuse a configuration that cannot run, before anything is touched.

    Raises
    ------
    UsageError
        Archive missing or unreadable, REPORT_DIR inside the archive or not creatable,
        batch size, workers or files per task out of range.
    """
    archive = config.archive
    if not archive.is_dir():
        raise UsageError(f"archive folder not found: {archive}")
    if not os.access(archive, os.R_OK | os.X_OK):
        raise UsageError(f"archive folder not readable: {archive}")
    try:
        os.scandir(archive).close()
    except OSError as exc:
        raise UsageError(f"archive folder not readable: {archive} ({exc.strerror})") from exc
    if config.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {config.workers}")
    if config.max_pixel_bytes < 1:
        raise UsageError("--max-pixel-bytes must be positive")
    out = config.out.resolve()
    root = archive.resolve()
    if out == root or root in out.parents:
        raise UsageError(f"--out {config.out} is inside the archive; the archive is never written")
    try:
        config.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create report folder {config.out}: {exc.strerror}") from exc
    if not os.access(config.out, os.W_OK | os.X_OK):
        raise UsageError(f"report folder not writable: {config.out}")


class Progress:
    """tqdm bars on a terminal; otherwise a short key=value log line now and then."""

    def __init__(self, bars: bool) -> None:
        self._bar = None
        self._last = time.monotonic()
        if bars:
            from tqdm import tqdm

            self._bar = tqdm(
                total=0, unit="file", desc="files", dynamic_ncols=True, file=sys.stderr
            )

    def __call__(self, stats: RunStats) -> None:
        """Update from the run's counts."""
        rate = stats.by_status[SCORED] / max(stats.seconds, 1e-9)
        if self._bar is not None:
            self._bar.total = stats.found
            self._bar.n = stats.done
            self._bar.set_postfix(
                found=stats.found,
                scored=stats.by_status[SCORED],
                images_s=f"{rate:.1f}",
                refresh=False,
            )
            self._bar.refresh()
        elif time.monotonic() - self._last >= LOG_EVERY_SECONDS:
            self._last = time.monotonic()
            log.info(
                "progress found=%d done=%d scored=%d skipped=%d failed=%d images_per_s=%.1f",
                stats.found,
                stats.done,
                stats.by_status[SCORED],
                stats.by_status[SKIPPED],
                stats.by_status[FAILED],
                rate,
            )

    def close(self) -> None:
        """Close the bar (if any)."""
        if self._bar is not None:
            self._bar.close()


def summary_text(manifest: dict[str, Any], studies: int, flagged: int) -> str:
    """The closing paragraph: short, because cron mails it."""
    counts = manifest["counts_by_status"]
    top = sorted(manifest["counts_by_reason"].items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    reasons = ", ".join(f"{reason} {n}" for reason, n in top) or "none"
    rate = manifest["images_per_second"]
    return (
        f"batchscan run {manifest['run_id']}: {manifest['files_found']} files in "
        f"{manifest['seconds']:.1f} s; scored {counts[SCORED]}, skipped {counts[SKIPPED]}, "
        f"failed {counts[FAILED]} (top reasons: {reasons}); {studies} studies, "
        f"{flagged} flagged at threshold {manifest['model']['threshold']:.3f}; "
        f"{rate if rate is not None else 0:.1f} images/s; model {manifest['model']['version']}; "
        f"reports in {manifest['arguments']['out']}."
    )


def load_for_scan(config: ScanConfig) -> LoadedModel:
    """Load the model, turning a model problem into a usage error (exit 2)."""
    try:
        return load_model(config.model_path)
    except ModelError as exc:
        raise UsageError(str(exc)) from exc


def run_scan(config: ScanConfig) -> ScanResult:
    """Run one scan and publish its reports.

    Raises
    ------
    UsageError
        Bad configuration or model (exit 2).
    batchscan.runlock.LockHeldError
        Another run holds REPORT_DIR (exit 3).
    """
    check_config(config)
    with report_dir_lock(config.out):
        loaded = load_for_scan(config)
        from batchscan.infer import Scorer

        scorer = Scorer(
            loaded, config.batch_size, jit_compile=config.jit_compile, precision=config.precision
        )  # type: ignore[arg-type]
        run_id = new_run_id()
        remove_temporaries(config.out)  # left by a run that was killed
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        writer = ImagesWriter(config.out, run_id, loaded.version)
        progress = Progress(config.progress)
        temporaries: list[tuple[Path, Path]] = []
        try:
            stats = run_local(config, scorer.score, writer.add, progress)
            progress.close()
            images_tmp = writer.close()
            temporaries.append((images_tmp, writer.final))
            images = read_images(
                images_tmp,
                ["study_instance_uid", "status", "score", "view", "accession_number", "study_date"],
            )
            studies = aggregate_studies(images, loaded.threshold, loaded.version)
            temporaries += write_studies(study_table(studies), config.out, run_id)
            model_info = {
                "path": str(loaded.path),
                "version": loaded.version,
                "threshold": loaded.threshold,
                "threshold_rule": loaded.card.get("threshold_rule"),
            }
            engine = {
                "name": "local",
                "workers": config.workers,
                "device": scorer.device,
                "precision": scorer.precision,
                "batch_size": config.batch_size,
            }
            manifest = manifest_for(config, stats, run_id, started_at, model_info, engine)
            manifest["studies"] = len(studies)
            manifest["studies_flagged"] = int(studies["flag"].sum()) if len(studies) else 0
            temporaries.append(write_manifest(manifest, config.out, run_id))
            for temporary, final in temporaries:
                publish(temporary, final)
        except BaseException:
            progress.close()
            writer.abort()
            remove_temporaries(config.out, run_id)
            raise
    return ScanResult(
        manifest=manifest, summary=summary_text(manifest, len(studies), manifest["studies_flagged"])
    )
