"""The rescoring stage: files whose row is sound but whose model changed are scored again from
their stored model inputs, without opening the archive.

Why a stage of its own: a site changes its model (a release, a site-trained model, a shadow
comparison) far more often than its films change. Everything a score needs is already kept:
the header facts in the state's row (:mod:`batchscan.results.state`) and the 64 x 64 input in the
model-input store (:mod:`batchscan.scoring.input_store`). So a row the state hands on
(:meth:`batchscan.results.state.StateStore.to_rescore`) is judged again against the model's
training domain from its header facts (:func:`batchscan.ingest.domain.judge`, the same function
the header stage calls), and its stored input is scored by the same scorer the engines use.
The blank rule needs no second look: it is part of the input key, and a stored input passed
it.

A stored input that turns out unusable (damaged, gone) is not an error: its record is handed
back, still pending, and the scan reads that file as it would a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from batchscan.ingest.domain import judge
from batchscan.ingest.header import StageOptions
from batchscan.ingest.paths import state_key
from batchscan.ingest.records import ImageRecord, Scores
from batchscan.scoring.input_store import InputStore


@dataclass(slots=True)
class Rescored:
    """What :func:`rescore` did: files scored again from their stored inputs (not those
    the new domain now skips), and those whose stored input could not be used (to be read
    from the archive)."""

    rescored: int
    unusable: list[ImageRecord]


def rescore(
    batches: Iterable[list[ImageRecord]],
    store: InputStore,
    input_key: str,
    options: StageOptions,
    score: Callable[[np.ndarray], Scores],
    sink: Callable[[list[ImageRecord]], None],
) -> Rescored:
    """Judge and score each batch of rebuilt records from its stored inputs.

    Parameters
    ----------
    batches:
        Records rebuilt from state rows, pending, with their header facts.
    store, input_key:
        Where the inputs are, and the key they must have been made under.
    options:
        The run's stage options (the model's training domain, ``--out-of-domain``).
    score:
        The scorer of the engines (:class:`batchscan.scan.LazyScorer`).
    sink:
        Gets the finished records of each batch (the state saves them).
    """
    done = 0
    unusable: list[ImageRecord] = []
    for batch in batches:
        identities = [(state_key(r.path), r.size, r.mtime_ns) for r in batch]
        inputs = store.get(identities, input_key)
        ready = []
        for record, (key, _, _) in zip(batch, identities, strict=True):
            if key in inputs:
                ready.append((record, inputs[key]))
            else:
                unusable.append(record)
        for record, _ in ready:
            judge(record, options.domain, options.skip_out_of_domain)
            if not record.pending:  # skipped before decoding, as a fresh read would be
                record.voi_source = record.modality_source = record.decoder = None
                record.decode_scale = None
        to_score = [(record, x) for record, x in ready if record.pending]
        if to_score:
            scores = score(np.stack([x for _, x in to_score]))
            for k, (record, _) in enumerate(to_score):
                scores.apply(record, k)
            done += len(to_score)
        if ready:
            sink([record for record, _ in ready])
    return Rescored(rescored=done, unusable=unusable)
