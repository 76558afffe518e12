"""The scan job: one run of ``batchscan scan`` from a :class:`ScanConfig` to published reports.

Order of a run: refuse bad input (:class:`UsageError`, exit 2) -> check the model's card ->
lock REPORT_DIR (:class:`~batchscan.results.runlock.LockHeldError`, exit 3) -> open the incremental
state -> stream discovery past the state (unchanged files are reused) into the engine, whose
results are committed to the state in checkpoints -> finish the state (vanished files,
duplicates, touched studies re-aggregated) -> write every report from the state to a
temporary file -> publish them all with atomic renames. If anything fails before the end,
the temporary files are removed, the previous reports stay as they were, and the state keeps
its last checkpoint, from which the next run goes on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from batchscan import __version__
from batchscan.engines.pipeline import RunStats, ScanConfig, manifest_for, new_run_id, run_local
from batchscan.ingest.discover import iter_files
from batchscan.ingest.domain import Domain
from batchscan.ingest.paths import state_key
from batchscan.ingest.records import FAILED, SCORED, SKIPPED, ImageRecord, Scores
from batchscan.results.aggregate import aggregate_studies
from batchscan.results.keys import row_keys
from batchscan.results.report import (
    DISCREPANCIES_SCHEMA,
    PERFORMANCE_SCHEMA,
    write_frame,
    write_images,
    write_manifest,
    write_runs,
    write_studies,
)
from batchscan.results.report_html import REPORT_FILE, ReportInputs, write_report
from batchscan.results.runlock import report_dir_lock
from batchscan.results.state import RUN_STUDY_COUNTS, STATE_FILE, StateError, StateStore
from batchscan.scoring.input_store import STORE_FILE, InputStore
from batchscan.scoring.model import ModelCard, ModelError, check_model, load_model
from batchscan.scoring.rescore import rescore
from batchscan.site.label_cache import LABELS_DB
from batchscan.site.monitoring import PERIODS, Monitored, monitor
from batchscan.storage.files import private_files, publish, remove_temporaries, temporary_path

log = logging.getLogger("batchscan")

#: Seconds between progress log lines when stderr is not a terminal (cron).
LOG_EVERY_SECONDS = 60.0


class UsageError(ValueError):
    """Bad arguments or configuration (exit status 2)."""


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What a finished run reports back to the command line: the manifest, the summary
    paragraph, lines to print after it (``WARNING: performance``), and problems that make
    the run's exit status 1 although it published (a reports file with a bad row)."""

    manifest: dict[str, Any]
    summary: str
    warnings: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()


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
    if config.out_of_domain not in ("score", "skip"):
        raise UsageError(f"--out-of-domain must be score or skip, got {config.out_of_domain!r}")
    if config.engine not in ("local", "ray"):
        raise UsageError(f"--engine must be local or ray, got {config.engine!r}")
    if config.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise UsageError("--engine ray needs Ray: pip install 'batchscan[ray]'")
    if config.ray_address and config.engine != "ray":
        raise UsageError("--ray-address is for --engine ray")
    if config.engine == "ray" and config.ray_address:
        from batchscan.engines.ray_engine import unreachable

        problem = unreachable(config.ray_address)
        if problem:
            raise UsageError(f"Ray cluster at --ray-address {config.ray_address}: {problem}")
    root = archive.resolve()
    _writable_outside(config.out, root, "--out", "report folder")
    if config.monitor_period not in PERIODS:
        raise UsageError(f"--monitor-period must be week or month, got {config.monitor_period!r}")
    if config.reports_file is not None and not (
        config.reports_file.is_file() or config.reports_file.is_dir()
    ):
        raise UsageError(f"--reports-file not found: {config.reports_file}")
    if config.sr_out is not None:
        _writable_outside(config.sr_out, root, "--sr-out", "SR folder")
        if importlib.util.find_spec("highdicom") is None:
            raise UsageError("--sr-out needs highdicom: pip install highdicom")


def _writable_outside(folder: Path, archive_root: Path, option: str, what: str) -> None:
    """Refuse an output `folder` inside the archive, or one that cannot be made or written;
    make it otherwise (`option` and `what` name it in the one-line message)."""
    resolved = folder.resolve()
    if resolved == archive_root or archive_root in resolved.parents:
        raise UsageError(f"{option} {folder} is inside the archive; the archive is never written")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {what} {folder}: {exc.strerror}") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{what} not writable: {folder}")


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
            self._bar.total = stats.found + stats.reused
            self._bar.n = stats.done + stats.reused
            self._bar.set_postfix(
                unchanged=stats.reused,
                scored=stats.by_status[SCORED],
                images_s=f"{rate:.1f}",
                refresh=False,
            )
            self._bar.refresh()
        elif time.monotonic() - self._last >= LOG_EVERY_SECONDS:
            self._last = time.monotonic()
            log.info(
                "progress unchanged=%d new=%d done=%d scored=%d skipped=%d failed=%d "
                "images_per_s=%.1f",
                stats.reused,
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


def summary_text(manifest: dict[str, Any]) -> str:
    """The closing paragraph: short, because cron mails it."""
    counts = manifest["counts_by_status"]
    top = sorted(manifest["counts_by_reason"].items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    reasons = ", ".join(f"{reason} {n}" for reason, n in top) or "none"
    rate = manifest["images_per_second"]
    return (
        f"batchscan run {manifest['run_id']}: {manifest['files_found']} files "
        f"({manifest['files_processed']} new or changed, {manifest['files_reused']} unchanged"
        + (
            f" of which {manifest['files_rescored']} rescored from stored inputs"
            if manifest.get("files_rescored")
            else ""
        )
        + ", "
        f"{manifest.get('files_removed', 0)} removed) in {manifest['seconds']:.1f} s; "
        f"scored {counts[SCORED]}, skipped {counts[SKIPPED]}, "
        f"failed {counts[FAILED]} (top reasons: {reasons}); {manifest['studies']} studies "
        f"({manifest['studies_in_domain']} in the model's training domain, "
        f"{manifest['studies_out_of_domain']} outside, "
        f"{manifest['studies_domain_unknown']} undecided), "
        f"{manifest['studies_flagged']} flagged at threshold "
        f"{manifest['model']['threshold']:.3f}; "
        f"{rate if rate is not None else 0:.1f} images/s this run; "
        f"model {manifest['model']['version']}; "
        f"reports in {manifest['arguments']['out']}."
        + (f" {manifest['sr']['summary']}" if "sr" in manifest else "")
    )


class LazyScorer:
    """Loads the model and compiles inference on the first batch that needs it.

    A nightly run over an archive with nothing new never imports TensorFlow, which is most
    of the start-up of a run.
    """

    def __init__(
        self, config: ScanConfig, checked: ModelCard, shadow: ModelCard | None = None
    ) -> None:
        self._config, self._checked, self._shadow = config, checked, shadow
        self._scorer: Any = None
        self._shadow_scorer: Any = None
        self._loaded: Any = None
        self.device: str | None = None
        self.precision: str | None = None
        #: Seconds spent importing TensorFlow and loading the models (0 until scoring).
        self.load_seconds = 0.0

    def loaded(self) -> Any:
        """The model (:class:`batchscan.scoring.model.LoadedModel`), loaded once for scoring and
        for the maps of report.html alike."""
        if self._loaded is None:
            try:
                self._loaded = load_model(self._checked.path)
            except ModelError as exc:
                raise UsageError(str(exc)) from exc
        return self._loaded

    def explainer(self) -> Any:
        """The map maker of report.html, on the model this run loaded (or loads now)."""
        from batchscan.results.saliency import Explainer

        return Explainer(self.loaded().keras_model)

    def __call__(self, inputs: np.ndarray) -> Scores:
        """Scores of model inputs (see :meth:`batchscan.scoring.infer.Scorer.score_ood`), with the
        shadow model's beside them when there is one."""
        if self._scorer is None:
            started = time.perf_counter()
            self._scorer = self._make(self.loaded())
            self.device, self.precision = self._scorer.device, self._scorer.precision
            if self._shadow is not None:
                try:
                    self._shadow_scorer = self._make(load_model(self._shadow.path))
                except ModelError as exc:
                    raise UsageError(f"--shadow-model: {exc}") from exc
            self.load_seconds = time.perf_counter() - started
        scores = self._scorer.score_ood(inputs)
        if self._shadow_scorer is None:
            return scores
        return replace(scores, shadow=np.clip(self._shadow_scorer.score(inputs), 0.0, 1.0))

    @property
    def compile_seconds(self) -> float:
        """Seconds the scorers spent on their first call at each batch shape."""
        scorers = [s for s in (self._scorer, self._shadow_scorer) if s is not None]
        return sum(s.compile_seconds for s in scorers)

    def _make(self, model: Any) -> Any:
        from batchscan.scoring.infer import Scorer

        return Scorer(
            model,
            self._config.batch_size,
            jit_compile=self._config.jit_compile,
            precision=self._config.precision,  # type: ignore[arg-type]
        )


def run_scan(config: ScanConfig) -> ScanResult:
    """Run one scan and publish its reports.

    Raises
    ------
    UsageError
        Bad configuration or model (exit 2).
    batchscan.results.runlock.LockHeldError
        Another run holds REPORT_DIR (exit 3).
    """
    check_config(config)
    try:
        checked = check_model(config.model_path)
    except ModelError as exc:
        raise UsageError(str(exc)) from exc
    shadow = None
    if config.shadow_model is not None:
        try:
            shadow = check_model(config.shadow_model)
        except ModelError as exc:
            raise UsageError(f"--shadow-model: {exc}") from exc
    with private_files(), report_dir_lock(config.out):
        store = InputStore(config.out / STORE_FILE)
        try:
            path = config.state if config.state is not None else config.out / STATE_FILE
            state = StateStore(path, config.checkpoint_seconds, on_commit=store.commit)
        except StateError as exc:
            store.close()
            raise UsageError(str(exc)) from exc
        try:
            return _run(config, checked, shadow, state, store)
        finally:
            state.close()
            store.close()


def _run(
    config: ScanConfig,
    checked: ModelCard,
    shadow: ModelCard | None,
    state: StateStore,
    store: InputStore,
) -> ScanResult:
    """The run proper, with the lock held and the state open."""
    run_id = new_run_id()
    # the card's training domain reaches the per-file stages
    config = replace(config, domain=Domain.from_card(checked.card))
    remove_temporaries(config.out)  # left by a run that was killed
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    keys = row_keys(config, checked, shadow)
    interrupted = state.begin_run(run_id, started_at, checked.version, __version__)
    if interrupted:
        log.info("previous run interrupted; finishing its work (%d run(s))", interrupted)
    scorer = LazyScorer(config, checked, shadow)
    progress = Progress(config.progress)
    stats = RunStats()
    temporaries: list[tuple[Path, Path]] = []

    def reused(n: int) -> None:
        stats.reused += n
        progress(stats)

    try:
        holds = partial(store.holds, input_key=keys.input)
        pending = state.pending(
            iter_files(config.archive), run_id, keys, checked.version, reused, holds
        )

        def save(records: list[ImageRecord], inputs: dict[int, np.ndarray]) -> None:
            # the inputs first: the state's checkpoint commits them before its rows
            store.put(
                ((state_key(r.path), r.size, r.mtime_ns), keys.input, inputs[i])
                for i, r in enumerate(records)
                if i in inputs and r.status == SCORED
            )
            store.delete(state_key(r.path) for r in records if r.status != SCORED)
            state.save(records, run_id, keys, checked.version)

        def engine(records: Iterable[ImageRecord]) -> None:
            if config.engine == "ray":
                from batchscan.engines.ray_engine import ClusterError, run_ray

                try:
                    run_ray(config, records, checked.path, save, progress, stats)
                except ClusterError as exc:
                    raise UsageError(f"the Ray cluster cannot run this scan: {exc}") from exc
            else:
                run_local(config, records, scorer, save, progress, stats)

        clock = time.perf_counter()
        engine(pending)
        stages = {"read_and_score": time.perf_counter() - clock}
        clock = time.perf_counter()
        # the scored files whose model or domain changed: scored from their stored inputs
        again = rescore(
            state.to_rescore(run_id, keys, os.path.abspath(config.archive)),
            store,
            keys.input,
            config.stage_options,
            scorer,
            lambda records: save(records, {}),
        )
        stats.rescored = again.rescored
        stages["rescore"] = time.perf_counter() - clock
        if again.unusable:  # their stored inputs were damaged: read them like new files
            stats.reused -= len(again.unusable)
            clock = time.perf_counter()
            engine(again.unusable)
            stages["read_and_score"] += time.perf_counter() - clock
        progress.close()
        clock = time.perf_counter()
        finished = state.finish(
            run_id,
            partial(
                aggregate_studies,
                threshold=checked.threshold,
                model_version=checked.version,
                shadow=(shadow.threshold, shadow.version) if shadow is not None else None,
            ),
            on_removed=store.delete,
        )
        if finished.files != stats.found + stats.reused:
            raise RuntimeError(
                f"accounting error: {stats.found + stats.reused} files found but "
                f"{finished.files} in the state"
            )
        with_key = config.pseudonym_key is not None
        temporaries.append(
            write_images(state.image_rows(), config.out, run_id, patient_key=with_key)
        )
        temporaries += write_studies(state.study_rows(), config.out, run_id, patient_key=with_key)
        study_counts = state.study_counts()
        model_info = {
            "path": str(checked.path),
            "version": checked.version,
            "threshold": checked.threshold,
            "threshold_rule": checked.card.get("threshold_rule"),
            "shadow": None
            if shadow is None
            else {
                "path": str(shadow.path),
                "version": shadow.version,
                "threshold": shadow.threshold,
            },
        }
        engine = {
            "name": config.engine,
            "ray_address": config.ray_address,
            "workers": config.workers,
            "device": scorer.device,
            "precision": scorer.precision,
            "batch_size": config.batch_size,
        }
        totals = (finished.files, finished.by_status, finished.by_reason)
        manifest = manifest_for(config, stats, totals, run_id, started_at, model_info, engine)
        manifest.update(
            files_removed=finished.removed,
            files_rescored=stats.rescored,
            input_store=_store_facts(store),
            **study_counts,
        )
        if config.sr_out is not None:
            manifest["sr"] = _write_srs(config, checked, state, run_id)
        monitored = _monitor(config, checked, state) if config.reports_file else None
        if monitored is not None:
            manifest["monitoring"] = {
                **monitored.facts,
                "warning": monitored.warning,
                "error": monitored.error,
            }
            if monitored.error is None:  # else the last good files stay
                assert monitored.performance is not None and monitored.discrepancies is not None
                temporaries += write_frame(
                    monitored.performance, PERFORMANCE_SCHEMA, config.out, "performance", run_id
                )
                temporaries += write_frame(
                    monitored.discrepancies,
                    DISCREPANCIES_SCHEMA,
                    config.out,
                    "discrepancies",
                    run_id,
                )
        stages["finish_and_reports"] = time.perf_counter() - clock  # report.html not in it
        stages["model_load"] = scorer.load_seconds  # inside the stage that first scored
        stages["compile"] = scorer.compile_seconds  # likewise, per batch shape
        manifest["seconds_by_stage"] = {k: round(v, 3) for k, v in stages.items()}
        state.end_run(run_id, "ok", _run_facts(manifest))
        temporaries.append(write_runs(state.run_rows(), config.out, run_id))
        temporaries.append(write_manifest(manifest, config.out, run_id))
        # this run's monitoring frames, or None: the page reads the last good ones
        fresh = monitored if monitored is not None and monitored.error is None else None
        page = ReportInputs(
            config.out,
            manifest,
            checked.card,
            config.archive,
            explainer=scorer.explainer,
            performance=fresh.performance if fresh else None,
            discrepancies=fresh.discrepancies if fresh else None,
            stored_input=partial(_stored_input, state, store, keys.input),
        )
        temporaries.append(
            write_report(state, page, temporary_path(config.out / REPORT_FILE, run_id))
        )
        for temporary, final in temporaries:
            publish(temporary, final)
    except BaseException:
        progress.close()
        remove_temporaries(config.out, run_id)
        with contextlib.suppress(Exception):
            state.end_run(run_id, "failed", {"seconds": round(stats.seconds, 3)})
        raise
    return ScanResult(
        manifest=manifest,
        summary=summary_text(manifest),
        warnings=(monitored.warning,) if monitored and monitored.warning else (),
        problems=(
            (f"monitoring not updated (the last good performance files stay): {monitored.error}",)
            if monitored and monitored.error
            else ()
        ),
    )


def _stored_input(
    state: StateStore, store: InputStore, input_key: str, stored_path: Any
) -> np.ndarray | None:
    """The stored model input of one file of the state (report.html's thumbnails)."""
    identity = state.file_identity(stored_path)
    if identity is None:
        return None
    return store.get([(stored_path, *identity)], input_key).get(stored_path)


def _monitor(config: ScanConfig, checked: ModelCard, state: StateStore) -> Monitored:
    """The monitoring stage (:mod:`batchscan.site.monitoring`) on the state's studies, with the
    site's last evaluate as the fallback reference (evaluate imported only here)."""
    from batchscan.site.evaluate import last_overall_auc

    assert config.reports_file is not None
    return monitor(
        config.reports_file,
        config.out / LABELS_DB,
        state.study_scores(),
        period=config.monitor_period,
        threshold=checked.threshold,
        model_version=checked.version,
        reference_auc=last_overall_auc(config.out),
    )


def _write_srs(
    config: ScanConfig, checked: ModelCard, state: StateStore, run_id: str
) -> dict[str, Any]:
    """The SR stage (:mod:`batchscan.pacs.write`), imported only when asked for."""
    from batchscan.pacs.outbox import OutboxError
    from batchscan.pacs.sr import Algorithm
    from batchscan.pacs.write import write_srs

    assert config.sr_out is not None
    algorithm = Algorithm(model_version=checked.version, threshold=checked.threshold)
    try:
        outcome = write_srs(
            state, config.archive, config.sr_out, algorithm, run_id, workers=config.workers
        )
    except OutboxError as exc:
        raise UsageError(str(exc)) from exc
    return {**outcome.manifest(), "summary": outcome.summary()}


def _store_facts(store: InputStore) -> dict[str, Any]:
    """The manifest's ``input_store`` entry: entries, bytes on disk and per entry, and how
    often it had to be started afresh this run."""
    store.commit()
    facts: dict[str, Any] = {"path": str(store.path), **store.stats(), "resets": store.resets}
    entries = facts["entries"]
    facts["bytes_per_image"] = round(facts["bytes"] / entries) if entries else None
    return facts


def _run_facts(manifest: dict[str, Any]) -> dict[str, Any]:
    """The columns of runs.parquet, from the manifest."""
    counts = manifest["counts_by_status"]
    return {
        "finished_at": manifest["finished_at"],
        "files_found": manifest["files_found"],
        "files_processed": manifest["files_processed"],
        "files_reused": manifest["files_reused"],
        "files_removed": manifest["files_removed"],
        "scored": counts[SCORED],
        "skipped": counts[SKIPPED],
        "failed": counts[FAILED],
        "images_scored_this_run": manifest["images_scored_this_run"],
        "images_per_second": manifest["images_per_second"],
        "seconds": manifest["seconds"],
        **{k: manifest[k] for k in RUN_STUDY_COUNTS},
    }
