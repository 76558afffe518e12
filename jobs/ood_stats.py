#!/usr/bin/env python3
"""Fit a trained model's out-of-distribution statistics and name them in its card.

Usage:
    python jobs/ood_stats.py [--model batchscan/models/pneumonia_cnn_seed.keras] [--data NPZ]

``jobs/train.py`` does this for every model it trains; this job adds the statistics to a
model trained before they existed (the shipped one), without training again: it runs the
same :func:`batchscan.site.training.write_ood_statistics` on the same train split, and leaves the
model file (and so ``model_version``) untouched.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from batchscan.scoring.model import card_path_for, default_model_path, load_model
from batchscan.site.training import default_npz_path, load_npz, write_ood_statistics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--data", type=Path, default=None, help="the model's training npz")
    args = parser.parse_args(argv)
    data = args.data or default_npz_path(Path(__file__).resolve().parents[1])
    if not data.is_file():
        parser.exit(2, f"ood_stats: data file not found: {data}\n")
    dataset = load_npz(data)
    card_path = card_path_for(args.model)
    card = json.loads(card_path.read_text(encoding="utf-8"))
    if card.get("training_data", {}).get("sha256") not in (None, dataset.sha256):
        parser.exit(2, f"ood_stats: {data} is not the data the card says the model learned\n")
    card.pop("ood", None)
    loaded = load_model(args.model)
    section = write_ood_statistics(
        loaded.keras_model, dataset.x["train"], dataset.y["train"], args.model
    )
    # keep the card's key order: the OOD entry goes after the sanity gate
    ordered: dict = {}
    for key, value in card.items():
        ordered[key] = value
        if key == "sanity":
            ordered["ood"] = section
    ordered.setdefault("ood", section)
    card_path.write_text(json.dumps(ordered, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(section, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
