"""The shipped model gives the recorded scores for fixed inputs, whatever TensorFlow and Keras.

tests/test_input_digests.py holds what the model *receives* for a film to the input version:
it fails when a release of pydicom, the pylibjpeg plugins, pyjpegls, imagecodecs, Pillow or
numpy changes a decoded, windowed or resized input. This test holds what the model *gives*:
fixed model inputs (``tests/data/recorded_inputs.npz``, the 16-bit stored inputs of the demo
archive's films and of pydicom's real radiographs, MR and CT, taken once and kept as data
so that no decoder is involved) go through the shipped model the way a scan scores them
(:class:`batchscan.scoring.infer.Scorer`, float32, with and without XLA), and every score and
OOD distance must equal the one in ``tests/data/recorded_scores.json`` within
:data:`SCORE_TOLERANCE`. A release of TensorFlow or Keras that changes a layer's arithmetic,
the loading of the weights or the compiled forward pass fails here.

The tolerance is the one a scan in the image must keep against a scan on the host
(tests/test_container.py): float32 rounding on another CPU moves these scores by about 1e-7.

When it fails after a deliberate change (a new shipped model), write the scores afresh with
``python tests/test_recorded_scores.py``; after an upgrade, first find out why they moved.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from batchscan import versions
from batchscan.ingest.preprocess import CHANNELS
from batchscan.scoring.input_store import LEVELS
from batchscan.scoring.model import load_model

DATA = Path(__file__).parent / "data"
INPUTS = DATA / "recorded_inputs.npz"
SCORES = DATA / "recorded_scores.json"
#: How far a score may lie from the recorded one (probabilities in [0, 1]).
SCORE_TOLERANCE = 1e-5
#: How far an OOD distance may lie from the recorded one, relative to it.
OOD_TOLERANCE = 1e-4


def fixed_inputs() -> tuple[list[str], np.ndarray]:
    """The names and the (N, 64, 64, 3) float32 model inputs of the recorded films, made
    from their 16-bit levels as the input store makes them."""
    with np.load(INPUTS) as data:
        names, levels = [str(n) for n in data["names"]], data["levels"]
    grey = levels.astype(np.float32) / np.float32(LEVELS)
    return names, np.repeat(grey[..., None], CHANNELS, axis=3)


def current_scores(jit_compile: bool = True) -> dict[str, list[float]]:
    """The shipped model's scores and OOD distances of the fixed inputs, as a scan makes
    them."""
    from batchscan.scoring.infer import Scorer

    _, inputs = fixed_inputs()
    scorer = Scorer(load_model(), batch_size=256, jit_compile=jit_compile, precision="float32")
    scores = scorer.score_ood(inputs)
    assert scores.ood_score is not None, "the shipped model has OOD statistics"
    return {"score": scores.score.tolist(), "ood_score": scores.ood_score.tolist()}


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "no-xla"])
def test_the_shipped_model_gives_the_recorded_scores(jit_compile: bool) -> None:
    recorded = json.loads(SCORES.read_text())
    assert recorded["model"] == load_model().version, (
        "another shipped model: write the scores afresh (python tests/test_recorded_scores.py)"
    )
    names, _ = fixed_inputs()
    now = current_scores(jit_compile)
    score = np.abs(np.array(now["score"]) - recorded["score"])
    ood = np.abs(np.array(now["ood_score"]) - recorded["ood_score"]) / np.abs(recorded["ood_score"])
    moved = [names[i] for i in np.flatnonzero((score > SCORE_TOLERANCE) | (ood > OOD_TOLERANCE))]
    written = recorded["written_with"]
    assert not moved, (
        f"the shipped model's scores of {len(moved)} fixed inputs moved ({', '.join(moved[:4])};"
        f" score by up to {score.max():.2g}, OOD distance by {ood.max():.2g} of itself) with "
        f"tensorflow {versions()['tensorflow']}, keras {versions()['keras']} (recorded with "
        f"{written['tensorflow']}, {written['keras']}): the model now gives other scores for "
        "the same films"
    )


def test_the_recorded_scores_span_flagged_and_unflagged_films() -> None:
    """A test of scores near one value would miss a change that moves only the others."""
    recorded = json.loads(SCORES.read_text())
    threshold = load_model().threshold
    assert min(recorded["score"]) < threshold < max(recorded["score"])
    assert len(recorded["score"]) == len(fixed_inputs()[0]) >= 16


def _record() -> None:
    """Take the inputs of the input-digest files once (reduced resolution) and write them
    with the scores the shipped model gives them now."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.test_input_digests import current_inputs

    made = {k: v for k, v in current_inputs().items() if k.startswith("reduced/")}
    unique: dict[bytes, str] = {}
    for name, stored in made.items():
        if isinstance(stored, np.ndarray):
            unique.setdefault(stored.tobytes(), name)
    names = sorted(unique.values())
    np.savez_compressed(
        INPUTS,
        names=np.array(names),
        levels=np.stack([np.rint(made[n] * LEVELS).astype(np.uint16) for n in names]),
    )
    scores = current_scores()
    SCORES.write_text(
        json.dumps({"model": load_model().version, "written_with": versions(), **scores}, indent=1)
        + "\n"
    )
    print(f"wrote {INPUTS} and {SCORES} ({len(names)} inputs)", file=sys.stderr)


if __name__ == "__main__":
    _record()
