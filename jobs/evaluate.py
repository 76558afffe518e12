#!/usr/bin/env python3
"""Evaluate a model file on the PneumoniaMNIST test split, beside the published baselines.

Usage:
    python jobs/evaluate.py [--model PATH.keras] [--data PATH.npz]

Reads the model's card for its threshold, preprocesses the test images with the canonical
preprocessing and prints AUC (95 % bootstrap interval), accuracy, sensitivity, specificity
and ECE next to the published MedMNIST v2 results (../shared/data/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from batchscan.ingest.preprocess import preprocess_many
from batchscan.scoring.model import ModelError, load_model
from batchscan.site.metrics import split_metrics
from batchscan.site.training import default_npz_path

#: MedMNIST v2 (Yang et al., Scientific Data 2023), PneumoniaMNIST test split: (AUC, ACC).
PUBLISHED = [
    ("ResNet-18 (28)", 0.944, 0.854),
    ("ResNet-50 (28)", 0.948, 0.854),
    ("auto-sklearn", 0.942, 0.855),
    ("AutoKeras", 0.947, 0.878),
    ("Google AutoML Vision", 0.991, 0.946),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args(argv)
    data = args.data or default_npz_path(Path(__file__).resolve().parents[1])
    if not data.is_file():
        parser.exit(2, f"evaluate: data file not found: {data} (set --data or BATCHSCAN_DATA)\n")
    try:
        loaded = load_model(args.model)
    except ModelError as exc:
        parser.exit(2, f"evaluate: {exc}\n")
    with np.load(data) as arrays:
        x = preprocess_many(arrays["test_images"])
        y = arrays["test_labels"].reshape(-1)
    scores = loaded.keras_model.predict(x, batch_size=512, verbose=0).reshape(-1)
    m = split_metrics(y, scores, loaded.threshold)
    rows = [(f"{loaded.version} (this model)", m.auc, m.accuracy), *PUBLISHED]
    print(
        f"PneumoniaMNIST test split: {m.n} images, {m.n_positive} pneumonia; "
        f"threshold {loaded.threshold:.4f} ({loaded.card.get('threshold_rule', '')[:40]}...)"
    )
    print(f"{'model':<44} {'AUC':>6} {'ACC':>6}")
    for name, auc, acc in rows:
        print(f"{name:<44} {auc:6.3f} {acc:6.3f}")
    print(
        f"\nthis model: AUC 95% CI [{m.auc_ci95[0]:.3f}, {m.auc_ci95[1]:.3f}], "
        f"sensitivity {m.sensitivity:.3f}, specificity {m.specificity:.3f}, ECE {m.ece:.3f}"
    )
    card_auc = loaded.card.get("test_auc")
    if card_auc is not None and abs(card_auc - m.auc) > 0.002:
        print(f"WARNING: card says test AUC {card_auc:.4f}, measured {m.auc:.4f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
