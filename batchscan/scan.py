"""The scan job: one run of ``batchscan scan`` from a :class:`ScanConfig` to published reports.

Order of a run: refuse bad input (:class:`UsageError`, exit 2) -> check the model's card ->
lock REPORT_DIR (:class:`~batchscan.results.runlock.LockHeldError`, exit 3) -> open the incremental
state -> stream discovery past the state (unchanged files are reused) into the engine, whose
results are committed to the state in checkpoints -> finish the state (vanished files,
duplicates, touched studies re-aggregated) -> write every report from the state to a
temporary file (with the drift monitor's, :mod:`batchscan.site.drift`, from the state and the
input store) -> publish them all with atomic renames. If anything fails before the end,
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from batchscan import __version__, version_facts, versions
from batchscan.engines.pipeline import RunStats, ScanConfig, manifest_for, new_run_id, run_local
from batchscan.ingest.discover import iter_files
from batchscan.ingest.domain import Domain
from batchscan.ingest.paths import state_key
from batchscan.ingest.records import FAILED, SCORED, SKIPPED, ImageRecord, Scores, chunks
from batchscan.ingest.sources import (
    PacsArchive,
    SourceConfigError,
    Window,
    high_water_after,
    open_source,
)
from batchscan.results.aggregate import aggregate_studies
from batchscan.results.keys import reread_notice, row_keys
from batchscan.results.report import (
    DISCREPANCIES_SCHEMA,
    DRIFT_SCHEMA,
    PERFORMANCE_SCHEMA,
    write_frame,
    write_images,
    write_manifest,
    write_runs,
    write_studies,
)
from batchscan.results.report_html import REPORT_FILE, ReportInputs, write_report
from batchscan.results.runlock import report_dir_lock
from batchscan.results.state import RUN_STUDY_COUNTS, STATE_FILE, Finished, StateError, StateStore
from batchscan.scoring.input_store import STORE_FILE, InputStore
from batchscan.scoring.model import ModelCard, ModelError, check_model, load_model
from batchscan.scoring.rescore import rescore
from batchscan.site.drift import Drifted, monitor_drift
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
    paragraph, lines to print after it (``WARNING: performance``, ``WARNING: drift``), and
    problems that make the run's exit status 1 although it published (a reports file with a
    bad row, a drift monitor that failed)."""

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
    root = None if config.pacs is not None else _check_folder(Path(config.archive))
    if config.pacs is not None:
        _check_pacs(config.pacs, config.all_modalities)
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
    _writable_outside(config.out, root, "--out", "report folder")
    if config.monitor_period not in PERIODS:
        raise UsageError(
            f"--monitor-period must be {', '.join(PERIODS)}, got {config.monitor_period!r}"
        )
    if config.drift_reference is not None and config.drift_reference[0] > config.drift_reference[1]:
        raise UsageError("--drift-reference: FROM is after TO")
    if config.reports_file is not None and not (
        config.reports_file.is_file() or config.reports_file.is_dir()
    ):
        raise UsageError(f"--reports-file not found: {config.reports_file}")
    if config.sr_out is not None:
        _writable_outside(config.sr_out, root, "--sr-out", "SR folder")
        if importlib.util.find_spec("highdicom") is None:
            raise UsageError("--sr-out needs highdicom: pip install highdicom")


def _check_folder(archive: Path) -> Path:
    """The resolved archive folder, or :class:`UsageError` when it is missing or unreadable."""
    if not archive.is_dir():
        raise UsageError(f"archive folder not found: {archive}")
    if not os.access(archive, os.R_OK | os.X_OK):
        raise UsageError(f"archive folder not readable: {archive}")
    try:
        os.scandir(archive).close()
    except OSError as exc:
        raise UsageError(f"archive folder not readable: {archive} ({exc.strerror})") from exc
    return archive.resolve()


def _check_pacs(pacs: PacsArchive, all_modalities: bool) -> None:
    """:class:`UsageError` for a PACS that cannot be asked as given: a bad URL, credentials
    file, AE title or TLS file, a window or a number out of range (nothing is sent to the
    PACS yet)."""
    if pacs.pacs_connections < 1:
        raise UsageError(f"--pacs-connections must be at least 1, got {pacs.pacs_connections}")
    if not pacs.pacs_timeout > 0:
        raise UsageError(f"--pacs-timeout must be positive, got {pacs.pacs_timeout}")
    try:
        pacs.window(None)
        open_source(pacs.url, pacs.source_options(all_modalities)).close()
    except SourceConfigError as exc:
        raise UsageError(str(exc)) from exc


def _writable_outside(folder: Path, archive_root: Path | None, option: str, what: str) -> None:
    """Refuse an output `folder` inside the archive (`archive_root`; None for a PACS), or
    one that cannot be made or written; make it otherwise (`option` and `what` name it in
    the one-line message)."""
    resolved = folder.resolve()
    if archive_root is not None and (resolved == archive_root or archive_root in resolved.parents):
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
        + (f" {_pacs_sentence(manifest['pacs'])}" if "pacs" in manifest else "")
        + (f" {manifest['sr']['summary']}" if "sr" in manifest else "")
    )


def _pacs_sentence(pacs: dict[str, Any]) -> str:
    """What a PACS scan asked for: the window of study dates and what the query listed."""
    since, until = pacs["window"]
    dates = f"studies dated {since or 'any day'} to {until or 'now'}"
    return (
        f"PACS {pacs['source']}: {pacs['instances_listed']} instances listed for {dates} "
        f"(high-water mark now {pacs['high_water']})."
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
        scorer = self._main()
        if self._shadow is not None and self._shadow_scorer is None:
            started = time.perf_counter()
            try:
                self._shadow_scorer = self._make(load_model(self._shadow.path))
            except ModelError as exc:
                raise UsageError(f"--shadow-model: {exc}") from exc
            self.load_seconds += time.perf_counter() - started
        scores = scorer.score_ood(inputs)
        if self._shadow_scorer is None:
            return scores
        return replace(scores, shadow=np.clip(self._shadow_scorer.score(inputs), 0.0, 1.0))

    def features(self, inputs: np.ndarray) -> np.ndarray:
        """The penultimate features of model inputs (the drift monitor's, see
        :meth:`batchscan.scoring.infer.Scorer.features`), from the model this run loaded, or
        loads now: a night whose vectors are all kept never loads it."""
        return self._main().features(inputs)

    def _main(self) -> Any:
        """The scorer of the model in use, made on first need."""
        if self._scorer is None:
            started = time.perf_counter()
            self._scorer = self._make(self.loaded())
            self.device, self.precision = self._scorer.device, self._scorer.precision
            self.load_seconds += time.perf_counter() - started
        return self._scorer

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
            if config.pacs is not None:
                from batchscan.engines.fetch import close_worker_sources

                close_worker_sources()  # what fetched in this process (--workers 0, pictures)


def _run(
    config: ScanConfig,
    checked: ModelCard,
    shadow: ModelCard | None,
    state: StateStore,
    store: InputStore,
) -> ScanResult:
    """The run proper, with the lock held and the state open: the steps of :class:`_Run`
    in order. If any step fails, this run's temporary reports are removed (the previous
    reports stay), the run is recorded as failed, and the state keeps its last checkpoint."""
    run = _Run(config, checked, shadow, state, store)
    try:
        run.read_and_score()
        run.rescore_from_the_store()
        finished = run.finish_the_state()
        manifest = run.write_the_tables(finished)
        run.write_the_srs(manifest)
        monitored = run.monitor(manifest)
        drifted = run.watch_drift(manifest)
        run.record_the_run(manifest)
        run.write_the_page(manifest, monitored, drifted)
        run.publish()
    except BaseException:
        run.abandon()
        raise
    problems = []
    if monitored and monitored.error:
        problems.append(
            f"monitoring not updated (the last good performance files stay): {monitored.error}"
        )
    if drifted.error:
        problems.append(f"drift not updated (the last good drift files stay): {drifted.error}")
    return ScanResult(
        manifest=manifest,
        summary=summary_text(manifest),
        warnings=(*(monitored.warnings if monitored else ()), *filter(None, [drifted.warning])),
        problems=tuple(problems),
    )


class _Run:
    """One run's steps and what they share: the run's id and keys, the scorer, the counts,
    the seconds per stage, and the temporary reports that :meth:`publish` makes visible
    together at the end.

    Beginning one clears the temporary files a killed run left and records this run in the
    state (runs a killed process left ``running`` become ``interrupted``).
    """

    def __init__(
        self,
        config: ScanConfig,
        checked: ModelCard,
        shadow: ModelCard | None,
        state: StateStore,
        store: InputStore,
    ) -> None:
        self.run_id = new_run_id()
        # the card's training domain reaches the per-file stages
        self.config = config = replace(config, domain=Domain.from_card(checked.card))
        self.checked, self.shadow, self.state, self.store = checked, shadow, state, store
        remove_temporaries(config.out)  # left by a run that was killed
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.keys = row_keys(config, checked, shadow)
        if notice := reread_notice(state, config):  # before the re-read, with its cost
            log.warning(notice)
        facts = {**version_facts(versions()), "row_keys": str(self.keys)}
        interrupted = state.begin_run(
            self.run_id, self.started_at, checked.version, __version__, facts
        )
        if interrupted:
            log.info("previous run interrupted; finishing its work (%d run(s))", interrupted)
        #: A PACS scan: the dates its query asks for, and how many instances it listed.
        self.window: Window | None = None
        self.listed = 0
        if config.pacs is not None:
            mark = state.high_water(config.pacs.name)
            self.window = config.pacs.window(date.fromisoformat(mark[0]) if mark else None)
        self.scorer = LazyScorer(config, checked, shadow)
        self.progress = Progress(config.progress)
        self.stats = RunStats()
        self.stages: dict[str, float] = {}
        #: (temporary, final) of every report written so far, published by :meth:`publish`.
        self.temporaries: list[tuple[Path, Path]] = []
        self._reports_started = 0.0

    # -- the steps, in order -----------------------------------------------------------

    def read_and_score(self) -> None:
        """Stream discovery past the state (unchanged files are reused unopened) into the
        engine, which reads, scores and saves the rest."""
        holds = partial(self.store.holds, input_key=self.keys.input)
        pending = self.state.pending(
            self._found(),
            self.run_id,
            self.keys,
            self.checked.version,
            self._reused,
            holds,
        )
        clock = time.perf_counter()
        self._engine(pending)
        self.stages["read_and_score"] = time.perf_counter() - clock

    def rescore_from_the_store(self) -> None:
        """Score again, from their stored inputs, the files whose model or domain changed;
        those whose stored input is damaged are read like new files."""
        clock = time.perf_counter()
        again = rescore(
            self.state.to_rescore(self.run_id, self.keys, self._root()),
            self.store,
            self.keys.input,
            self.config.stage_options,
            self.scorer,
            lambda records: self._save(records, {}),
        )
        self.stats.rescored = again.rescored
        self.stages["rescore"] = time.perf_counter() - clock
        if again.unusable:
            self.stats.reused -= len(again.unusable)
            clock = time.perf_counter()
            self._engine(again.unusable)
            self.stages["read_and_score"] += time.perf_counter() - clock
        self.progress.close()  # nothing more is read

    def finish_the_state(self) -> Finished:
        """Drop vanished files, resolve duplicates and aggregate the touched studies, in
        one transaction; every file found must be in the state."""
        self._reports_started = time.perf_counter()
        checked, shadow = self.checked, self.shadow
        window = self.window
        covered = None
        if window is not None and (window.since, window.until) != (None, None):
            covered = (_iso(window.since), _iso(window.until))  # the rest of the PACS stays
        finished = self.state.finish(
            self.run_id,
            partial(
                aggregate_studies,
                threshold=checked.threshold,
                model_version=checked.version,
                shadow=(shadow.threshold, shadow.version) if shadow is not None else None,
            ),
            on_removed=self.store.delete,
            covered=covered,
        )
        found = self.stats.found + self.stats.reused
        if finished.seen != found:
            raise RuntimeError(
                f"accounting error: {found} files found but {finished.seen} in the state"
            )
        if self.config.pacs is not None and window is not None:
            self._advance_high_water(self.config.pacs, window)
        return finished

    def write_the_tables(self, finished: Finished) -> dict[str, Any]:
        """Write images.parquet and the studies (Parquet and CSV) from the state, to
        temporary files; returns the run's manifest."""
        config, state, checked, shadow = self.config, self.state, self.checked, self.shadow
        with_key = config.pseudonym_key is not None
        self.temporaries.append(
            write_images(state.image_rows(), config.out, self.run_id, patient_key=with_key)
        )
        self.temporaries += write_studies(
            state.study_rows(), config.out, self.run_id, patient_key=with_key
        )
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
            "device": self.scorer.device,
            "precision": self.scorer.precision,
            "batch_size": config.batch_size,
        }
        totals = (finished.files, finished.by_status, finished.by_reason)
        manifest = manifest_for(
            config, self.stats, totals, self.run_id, self.started_at, model_info, engine
        )
        manifest.update(
            files_removed=finished.removed,
            files_rescored=self.stats.rescored,
            input_store=_store_facts(self.store),
            **study_counts,
        )
        if self.config.pacs is not None and self.window is not None:
            mark = self.state.high_water(self.config.pacs.name)
            manifest["pacs"] = {
                "source": self.config.pacs.name,
                "window": [_iso(self.window.since), _iso(self.window.until)],
                "instances_listed": self.listed,
                "high_water": mark[0] if mark else None,
                "late_margin_days": self.config.pacs.late_margin_days,
            }
        return manifest

    def write_the_srs(self, manifest: dict[str, Any]) -> None:
        """With ``--sr-out``: an SR for every scored study whose content is new."""
        if self.config.sr_out is not None:
            manifest["sr"] = _write_srs(self.config, self.checked, self.state, self.run_id)

    def monitor(self, manifest: dict[str, Any]) -> Monitored | None:
        """With ``--reports-file``: the model against the radiologists' reports, written to
        temporary files unless the reports file was bad (then the last good ones stay)."""
        if not self.config.reports_file:
            return None
        monitored = _monitor(self.config, self.checked, self.state)
        manifest["monitoring"] = {
            **monitored.facts,
            "warning": monitored.warning,
            "disagreement_warning": monitored.disagreement_warning,
            "error": monitored.error,
        }
        if monitored.error is None:
            assert monitored.performance is not None and monitored.discrepancies is not None
            out, run_id = self.config.out, self.run_id
            self.temporaries += write_frame(
                monitored.performance, PERFORMANCE_SCHEMA, out, "performance", run_id
            )
            self.temporaries += write_frame(
                monitored.discrepancies, DISCREPANCIES_SCHEMA, out, "discrepancies", run_id
            )
        return monitored

    def watch_drift(self, manifest: dict[str, Any]) -> Drifted:
        """The films against the reference (:mod:`batchscan.site.drift`), from the state and
        the input store, written to temporary files unless the monitor failed (then the last
        good ones stay and the run ends with status 1)."""
        drifted = monitor_drift(
            self.state,
            self.store,
            period=self.config.monitor_period,
            input_key=self.keys.input,
            model_key=self.checked.version,
            features=self.scorer.features,
            reference=self.config.drift_reference,
        )
        manifest["drift"] = {**drifted.facts, "warning": drifted.warning, "error": drifted.error}
        if drifted.error is None:
            self.temporaries += write_frame(
                drifted.frame, DRIFT_SCHEMA, self.config.out, "drift", self.run_id
            )
        return drifted

    def record_the_run(self, manifest: dict[str, Any]) -> None:
        """The seconds by stage into the manifest, the run's outcome and figures into the
        state, and runs.parquet and manifest.json to temporary files."""
        stages = self.stages
        stages["finish_and_reports"] = time.perf_counter() - self._reports_started
        stages["model_load"] = self.scorer.load_seconds  # inside the stage that first scored
        stages["compile"] = self.scorer.compile_seconds  # likewise, per batch shape
        manifest["seconds_by_stage"] = {k: round(v, 3) for k, v in stages.items()}
        self.state.end_run(self.run_id, "ok", _run_facts(manifest))
        self.temporaries.append(write_runs(self.state.run_rows(), self.config.out, self.run_id))
        self.temporaries.append(write_manifest(manifest, self.config.out, self.run_id))

    def write_the_page(
        self, manifest: dict[str, Any], monitored: Monitored | None, drifted: Drifted
    ) -> None:
        """report.html, to a temporary file (not counted in the stages' seconds)."""
        config = self.config
        # this run's monitoring frames, or None: the page reads the last good ones
        fresh = monitored if monitored is not None and monitored.error is None else None
        pacs = config.pacs
        page = ReportInputs(
            config.out,
            manifest,
            self.checked.card,
            None if pacs is not None else Path(config.archive),
            explainer=self.scorer.explainer,
            performance=fresh.performance if fresh else None,
            discrepancies=fresh.discrepancies if fresh else None,
            stored_input=partial(_stored_input, self.state, self.store, self.keys.input),
            fetched=None if pacs is None else self._reader(),
            identity=self.state.file_identity,
            drift=drifted.frame if drifted.error is None else None,
        )
        temporary = temporary_path(config.out / REPORT_FILE, self.run_id)
        self.temporaries.append(write_report(self.state, page, temporary))

    def publish(self) -> None:
        """Make every report of the run visible, each replaced atomically."""
        for temporary, final in self.temporaries:
            publish(temporary, final)

    def abandon(self) -> None:
        """After a failure: remove this run's temporary files (the previous reports stay)
        and record the run as failed."""
        self.progress.close()
        remove_temporaries(self.config.out, self.run_id)
        with contextlib.suppress(Exception):
            self.state.end_run(self.run_id, "failed", {"seconds": round(self.stats.seconds, 3)})

    # -- what the steps share ----------------------------------------------------------

    def _found(self) -> Iterator[ImageRecord]:
        """Discovery: the archive folder's files, or the instances the PACS's query lists
        for this run's window of study dates (each noted in the state with the date it was
        listed under)."""
        pacs = self.config.pacs
        if pacs is None:
            yield from iter_files(Path(self.config.archive))
            return
        assert self.window is not None
        source = open_source(pacs.url, pacs.source_options(self.config.all_modalities))
        try:
            for locators in chunks(source.find(self.window), 500):
                self.state.list_instances((loc.path, loc.study_date) for loc in locators)
                self.listed += len(locators)
                yield from (loc.record() for loc in locators)
        finally:
            source.close()

    def _root(self) -> str:
        """Where the records rebuilt from the state are opened (a PACS's are fetched by
        their locator: none)."""
        return "" if self.config.pacs is not None else os.path.abspath(self.config.archive)

    def _reader(self) -> Any:
        """What fetches one of the PACS's instances by its path in this process (the
        report's pictures, the SR stage's headers)."""
        from batchscan.engines.fetch import InstanceReader

        pacs = self.config.pacs
        assert pacs is not None
        return InstanceReader(pacs.url, pacs.source_options(self.config.all_modalities))

    def _advance_high_water(self, pacs: PacsArchive, window: Window) -> None:
        """After a complete run: the PACS's high-water mark to the last day the run
        covered (a failed run leaves it, and the next run asks for the same dates)."""
        old = self.state.high_water(pacs.name)
        mark = high_water_after(date.fromisoformat(old[0]) if old else None, window, date.today())
        self.state.set_high_water(pacs.name, mark.isoformat(), pacs.late_margin_days, self.run_id)

    def _reused(self, n: int) -> None:
        self.stats.reused += n
        self.progress(self.stats)

    def _save(self, records: list[ImageRecord], inputs: dict[int, np.ndarray]) -> None:
        """Store finished records: their inputs first (the state's checkpoint commits them
        before its rows), then the rows."""
        self.store.put(
            ((state_key(r.path), r.size, r.mtime_ns), self.keys.input, inputs[i])
            for i, r in enumerate(records)
            if i in inputs and r.status == SCORED
        )
        self.store.delete(state_key(r.path) for r in records if r.status != SCORED)
        self.state.save(records, self.run_id, self.keys, self.checked.version)

    def _engine(self, records: Iterable[ImageRecord]) -> None:
        """Read and score `records` on this machine's cores or on the Ray cluster."""
        config = self.config
        if config.engine == "ray":
            from batchscan.engines.ray_engine import ClusterError, run_ray

            try:
                run_ray(config, records, self.checked.path, self._save, self.progress, self.stats)
            except ClusterError as exc:
                raise UsageError(f"the Ray cluster cannot run this scan: {exc}") from exc
        else:
            run_local(config, records, self.scorer, self._save, self.progress, self.stats)


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
        reference=config.drift_reference,
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
    archive: Any = config.archive
    if config.pacs is not None:  # the headers of a PACS's instances are fetched again
        from batchscan.engines.fetch import InstanceReader

        archive = InstanceReader(config.pacs.url, config.pacs.source_options(config.all_modalities))
    try:
        outcome = write_srs(
            state, archive, config.sr_out, algorithm, run_id, workers=config.workers
        )
    except OutboxError as exc:
        raise UsageError(str(exc)) from exc
    return {**outcome.manifest(), "summary": outcome.summary()}


def _iso(day: date | None) -> str | None:
    return None if day is None else day.isoformat()


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
        "device": manifest["engine"]["device"],
        **version_facts(manifest["versions"]),
    }
