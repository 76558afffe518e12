#!/usr/bin/env python3
"""Test-time augmentation for a site model: each later film scored as itself and as K small
shifts and zooms of itself, the scores averaged; the AUC within views against the film
scored once (docs/site/adapt.md, the levers' table).

Usage:
    python jobs/experiments/tta_check.py --work DIR [--hospitals kermany,shifted,marker] [--k 8]

Reads ``jobs/experiments/adapt_levers.py``'s working folder: each hospital's REPORT_DIR (the later
studies' model inputs come from its input store, as ``batchscan adapt`` reads them) and the
site models adapted there (every ``s*_*/site_cnn.keras``). Nothing is trained. Every later
study counts here (adapt leaves out those of patients seen in training), the same ones for
both columns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/, for common/
from common.hospitals import UNTIL

from batchscan.site import metrics

#: The augmentations: shifts of up to 2 pixels and zooms of up to 5 % (what the model's own
#: training augmentation already shows it; no flips, no contrast change).
SHIFT = 2
ZOOM = 0.05


def augmented(x: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """`x` (N, 64, 64, 3) and `k` shifted and zoomed copies of it (seeded)."""
    import keras

    layers = keras.Sequential(
        [
            keras.layers.RandomTranslation(SHIFT / 64, SHIFT / 64, fill_mode="nearest", seed=seed),
            keras.layers.RandomZoom(ZOOM, fill_mode="nearest", seed=seed + 1),
        ]
    )
    return [x] + [np.asarray(layers(x, training=True)) for _ in range(k)]


def main(argv: list[str] | None = None) -> int:
    from batchscan.scoring.model import load_model
    from batchscan.site.adapt import load_inputs, read_scan, scored_images, study_frame

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--hospitals", default="kermany,shifted,marker")
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args(argv)
    print(f"{'hospital':9s} {'model':18s} {'once':>7s} {'TTA':>7s} {'difference':>10s}")
    for kind in args.hospitals.split(","):
        report_dir = args.work / kind / "reports"
        if not report_dir.is_dir():
            continue
        manifest = read_scan(report_dir)
        rows = scored_images(report_dir, manifest)
        later = rows[rows["date"] > pd.Timestamp(UNTIL)]
        images, inputs, _ = load_inputs(report_dir, manifest, later, workers=0, progress=False)
        images = images.assign(label=_labels(report_dir, images))
        x = np.repeat(inputs[..., None], 3, axis=-1)
        copies = augmented(x, args.k)
        for model_dir in sorted((args.work / kind).glob("s*_*/")):
            if not (model_dir / "site_cnn.keras").is_file():
                continue
            loaded = load_model(model_dir / "site_cnn.keras")
            scores = [
                loaded.keras_model.predict(a, batch_size=512, verbose=0).reshape(-1) for a in copies
            ]
            figures = []
            for s in (scores[0], np.mean(scores, axis=0)):
                studies = study_frame(images, s, loaded.threshold)
                y = studies["label"].to_numpy(dtype=int)
                views = studies["view"].astype(str).to_numpy(dtype=object)
                figures.append(metrics.within_stratum_auc(y, studies["score"].to_numpy(), views)[0])
            print(
                f"{kind:9s} {model_dir.name:18s} {figures[0]:7.3f} {figures[1]:7.3f} "
                f"{figures[1] - figures[0]:+10.3f}",
                flush=True,
            )
    return 0


def _labels(report_dir: Path, images: pd.DataFrame) -> np.ndarray:
    """1 pneumonia, 0 normal from the scan's report labels (every simulated report is
    decided)."""
    from batchscan.site.adapt import site_labels

    labels, _ = site_labels(report_dir, None)
    return (images["accession_number"].map(labels) == "pneumonia").astype(int).to_numpy()


if __name__ == "__main__":
    raise SystemExit(main())
