"""The SR stage of a scan (``--sr-out``): an SR for every scored study whose content is new.

Runs after the state is finished (every study aggregated), from the state alone plus the
headers of the scored files of the studies that need a new SR:

1. stream the scored studies with their scored images
   (:meth:`batchscan.results.state.StateStore.scored_study_images`);
2. derive each study's SR UID from its content; a UID the outbox ledger holds is unchanged
   (nothing read, nothing written);
3. otherwise read the scored files' headers (pixels never) and make the SR from the run's
   :class:`~batchscan.pacs.template.SrTemplate` (built once per model and run, in each
   process that makes SRs; worker processes only in a run of more than
   :data:`POOL_AFTER` new SRs);
4. write the SRs of a batch atomically (:func:`batchscan.storage.files.write_many`: each to
   a hidden temporary file, then one sync of the outbox's file system for them all, then
   each renamed into place and the renames synced; 0640) and record them in the ledger, in
   one transaction;
5. name the studies that had an SR and have no scored image any more.

A study whose headers cannot serve (a file changed or vanished since it was scored, or a
header highdicom refuses) gets no SR this run and is counted by reason; the next run tries
again. No patient value reaches a log: reasons are fixed codes and studies are named by UID.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

from batchscan.engines.pipeline import worker_context
from batchscan.ingest.records import INTERPRETER_EXITS
from batchscan.pacs.outbox import Outbox
from batchscan.pacs.sr import (
    Algorithm,
    EvidenceError,
    Fetch,
    StudyResult,
    content_digest,
    read_evidence,
    sr_file,
    sr_instance_uid,
    study_results,
)
from batchscan.pacs.template import SrTemplate
from batchscan.results.state import StateStore
from batchscan.storage import files

log = logging.getLogger("batchscan")

#: A temporary SR file older than this was left by a killed run (a live one holds its
#: temporary file for milliseconds); the next run removes it.
STALE_TEMPORARY_SECONDS: Final = 600.0
#: Studies named in the one-line summary (all are in manifest.json, up to MANIFEST_LOST).
SUMMARY_LOST: Final = 5
#: SRs made, written and recorded together (one ledger commit for them all): a run killed
#: in the middle loses at most this many SRs' work, which the next run does again.
JOBS_PER_FLUSH: Final = 256
#: SRs a run makes in its own process before it starts its worker processes.
POOL_AFTER: Final = 4096
MANIFEST_LOST: Final = 1000


@dataclass(slots=True)
class SrOutcome:
    """What the SR stage did in one run (``manifest.json``'s ``sr`` section)."""

    outbox: Path
    written: int = 0
    unchanged: int = 0
    not_written: Counter[str] = field(default_factory=Counter)
    lost_studies: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def manifest(self) -> dict[str, Any]:
        """The section of ``manifest.json``."""
        return {
            "out": str(self.outbox),
            "written": self.written,
            "unchanged": self.unchanged,
            "not_written": sum(self.not_written.values()),
            "not_written_by_reason": dict(sorted(self.not_written.items())),
            "studies_without_scored_images": len(self.lost_studies),
            "study_uids_without_scored_images": self.lost_studies[:MANIFEST_LOST],
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        """The SR sentence of the run's closing paragraph."""
        text = f"SRs: {self.written} written, {self.unchanged} unchanged"
        if self.not_written:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.not_written.items()))
            text += f", {sum(self.not_written.values())} not written ({reasons})"
        if self.lost_studies:
            named = ", ".join(self.lost_studies[:SUMMARY_LOST])
            more = len(self.lost_studies) - SUMMARY_LOST
            text += (
                f"; {len(self.lost_studies)} studies with an earlier SR have no scored image "
                f"now (earlier SRs kept): {named}" + (f" and {more} more" if more > 0 else "")
            )
        return text + f" in {self.outbox}."


def remove_stale_temporaries(outbox: Path, older_than: float = STALE_TEMPORARY_SECONDS) -> None:
    """Delete the temporary SR files that a killed run left behind."""
    limit = time.time() - older_than
    for path in outbox.glob("*/.*.tmp"):
        try:
            if path.stat().st_mtime < limit:
                path.unlink()
        except OSError:
            continue


@functools.lru_cache(maxsize=1)
def sr_template(algorithm: Algorithm, analysed_at: datetime) -> SrTemplate:
    """The run's template (built once per process that makes SRs)."""
    return SrTemplate(algorithm, analysed_at)


def encode_sr(
    study: StudyResult,
    archive: Path | Fetch,
    algorithm: Algorithm,
    uid: str,
    number: int,
    analysed_at: datetime,
) -> bytes:
    """A study's SR as the bytes of a DICOM file.

    Raises
    ------
    EvidenceError
        The study's files cannot serve as evidence, or their headers hold values that no
        valid SR can carry (``source_invalid``).
    """
    template = sr_template(algorithm, analysed_at)
    with warnings.catch_warnings():
        # pydicom warns about odd header values quoting them; no patient value is printed
        warnings.simplefilter("ignore")
        evidence = read_evidence(archive, study)
        try:
            return template.encode(study, evidence, uid, number)
        except INTERPRETER_EXITS:
            raise
        except Exception:
            # highdicom and pydicom refuse header values that no valid SR can carry: the
            # message may quote the value, so only a code is kept
            raise EvidenceError("source_invalid") from None


@dataclass(frozen=True, slots=True)
class _Job:
    """One SR to make: picklable, for a worker process."""

    study: StudyResult
    sop_instance_uid: str
    instance_number: int
    final: Path


def _encode_job(
    job: _Job, archive: Path | Fetch, algorithm: Algorithm, analysed_at: datetime
) -> bytes | str:
    """The SR's bytes, or the reason code why there is none (never an exception: one
    study's headers must not stop the others)."""
    try:
        return encode_sr(
            job.study, archive, algorithm, job.sop_instance_uid, job.instance_number, analysed_at
        )
    except EvidenceError as exc:
        return exc.reason


class _Encoder:
    """Makes SRs in this process, and in `workers` processes once a run has made
    :data:`POOL_AFTER` of them here: an SR costs a few milliseconds of CPU, and starting the
    processes (each imports highdicom and builds the template) seconds, which only a large
    first run over an archive earns back (measured on two cores: a 600-study run took 2.4x
    as long with workers as without)."""

    def __init__(
        self, archive: Path | Fetch, algorithm: Algorithm, analysed_at: datetime, workers: int
    ) -> None:
        self.encode = partial(
            _encode_job, archive=archive, algorithm=algorithm, analysed_at=analysed_at
        )
        self.workers, self.made = workers, 0
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, jobs: list[_Job]) -> list[bytes | str]:
        if self.workers <= 1 or len(jobs) < 2 or self.made < POOL_AFTER:
            self.made += len(jobs)
            return [self.encode(job) for job in jobs]
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=worker_context())
        chunk = max(1, len(jobs) // self.workers)
        try:
            return list(self._pool.map(self.encode, jobs, chunksize=chunk))
        except BrokenProcessPool:  # a process died (out of memory?): the rest in this one
            self.close()
            self.workers = 0
            return [self.encode(job) for job in jobs]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def analysis_time(state: StateStore, run_id: str) -> datetime:
    """When the run `run_id` started (the time of analysis its SRs state); now for a run
    the state does not know (the SR stage called on its own)."""
    runs = state.run_rows()
    for known, started in zip(runs["run_id"], runs["started_at"], strict=True):
        if known == run_id:
            return datetime.fromisoformat(started)
    return datetime.now(UTC)


def write_srs(
    state: StateStore,
    archive: Path | Fetch,
    outbox_dir: Path,
    algorithm: Algorithm,
    run_id: str,
    workers: int = 0,
    analysed_at: datetime | None = None,
) -> SrOutcome:
    """Write the SRs of every scored study whose content has no SR yet.

    The SRs are 0640 (:data:`batchscan.storage.files.PRIVATE_MODE`).

    Parameters
    ----------
    workers:
        Processes that build the SRs (0 or 1: this one).
    analysed_at:
        The time of analysis the SRs state (their Content Date and Time); by default the
        start of the run `run_id`, as the state has it.

    Raises
    ------
    OSError
        The outbox cannot be written (a full disk): the run fails, and the next one writes
        what this one did not.
    batchscan.pacs.outbox.OutboxError
        The outbox's ledger cannot be used.
    """
    started = time.monotonic()
    outcome = SrOutcome(outbox=outbox_dir)
    remove_stale_temporaries(outbox_dir)
    if analysed_at is None:
        analysed_at = analysis_time(state, run_id)
    encoder = _Encoder(archive, algorithm, analysed_at, workers)
    with Outbox(outbox_dir, create=True) as outbox:
        todo: list[_Job] = []

        def flush() -> None:
            # a file already there was written by a run killed before it recorded it
            there = [job.final.is_file() for job in todo]
            made = iter(encoder([job for job, done in zip(todo, there, strict=True) if not done]))
            made_now: list[tuple[Path, bytes]] = []
            recorded = []
            for job, done in zip(todo, there, strict=True):
                if done:  # complete (it was renamed into place), so its digest is the SR's
                    data = job.final.read_bytes()
                else:
                    data = next(made)
                    if isinstance(data, str):
                        outcome.not_written[data] += 1
                        continue
                    made_now.append((job.final, data))
                recorded.append((job, hashlib.sha256(data).hexdigest()))
            files.write_many(made_now, token=run_id)
            outbox.record_many(
                (j.sop_instance_uid, j.study.study_instance_uid, j.final, digest,
                 algorithm.model_version, j.study.score, j.instance_number)
                for j, digest in recorded
            )  # fmt: skip
            outcome.written += len(recorded)
            todo.clear()

        try:
            outbox.begin_pass()
            for study in study_results(state.scored_study_images()):
                uid = study.study_instance_uid
                outbox.seen(uid)
                sop = sr_instance_uid(content_digest(study, algorithm))
                if outbox.has(sop):
                    outbox.current(uid, sop)
                    outcome.unchanged += 1
                    continue
                final = sr_file(outbox_dir, uid, sop)
                todo.append(_Job(study, sop, outbox.next_instance_number(uid), final))
                if len(todo) >= JOBS_PER_FLUSH:
                    flush()
            flush()
        finally:
            encoder.close()
        outcome.lost_studies = outbox.lost_scored_images()
    outcome.seconds = time.monotonic() - started
    if outcome.not_written:
        log.warning(
            "no SR this run for %d studies (%s); the next run tries again",
            sum(outcome.not_written.values()),
            ", ".join(f"{r} {n}" for r, n in sorted(outcome.not_written.items())),
        )
    return outcome
