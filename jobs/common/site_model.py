"""A second model, as a site would deploy one, for the jobs and tests that need two models
(jobs/bench/lifecycle_benchmark.py, the tests' ``other_model`` fixture)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from batchscan.scoring.model import default_model_path


def site_model(folder: Path) -> Path:
    """The shipped model with its output layer's weights moved (its features, and so its
    OOD statistics, stay valid), saved with its own card: a stand-in for a site's model."""
    import keras

    from batchscan.scoring.model import sha256_of

    seed = default_model_path()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site_model.keras"
    model = keras.models.load_model(seed, compile=False)
    last = model.layers[-1]
    kernel, bias = last.get_weights()
    noise = np.random.default_rng(7).normal(0.0, float(kernel.std()), kernel.shape)
    last.set_weights([kernel + noise.astype(kernel.dtype), bias + 0.5])
    model.save(path)
    card = json.loads(seed.with_suffix(".json").read_text())
    card.update(name="site_model", model_file=path.name, model_sha256=sha256_of(path))
    path.with_suffix(".json").write_text(json.dumps(card, indent=2))
    ood_file = seed.with_suffix(".ood.npz")  # named by the card
    shutil.copy(ood_file, folder / ood_file.name)
    return path
