"""The measurement the blank-image rule rests on (batchscan/ingest/sanity.py).

    python jobs/experiments/blank_bound.py [--data ../shared/data] [--update-card]

Every picture of the data sets we have (PneumoniaMNIST train/val/test, kermany_224,
adult_normal_rsna_128), through the one preprocessing function, against pictures with no
anatomy: all-zero, constant, and noise only (uniform, Gaussian at two levels, Poisson counts
stretched by a 1-99 % window as the percentile fallback would), at 28 to 1024 px. Prints per
set the smallest spread (model input std) and the smallest structure (block-mean spread /
spread), and per kind of blank picture the largest of each, then how many real films and
blank pictures the rule (sanity.blank_detail) calls blank.

``--update-card`` writes the shipped card's ``sanity`` entry (sanity.describe on the train
split), which records the rule and how far the training pictures lie from it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from batchscan.ingest import sanity
from batchscan.ingest.preprocess import preprocess, preprocess_many
from batchscan.models import __file__ as models_init

BLANK_KINDS = ("zero", "constant", "uniform", "gauss_0.02", "gauss_0.3", "poisson")
SIZES = (28, 64, 256, 1024)


def real_sets(data: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, model inputs) of every data set we have."""
    npz = np.load(data / "pneumoniamnist_28_full.npz")
    for split in ("train", "val", "test"):
        yield f"pneumoniamnist {split}", preprocess_many(npz[f"{split}_images"])
    for name in ("kermany_224", "adult_normal_rsna_128"):
        with (data / name / "labels.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        pictures = [np.asarray(Image.open(data / name / r["path"]).convert("L")) for r in rows]
        yield name, np.stack([preprocess(p) for p in pictures])


def blank_picture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One picture with no anatomy, display values in [0, 1]."""
    shape = (size, size)
    if kind == "zero":
        return np.zeros(shape, np.float32)
    if kind == "constant":
        return np.full(shape, rng.uniform(), np.float32)
    if kind == "uniform":
        return rng.uniform(size=shape).astype(np.float32)
    if kind.startswith("gauss"):
        sigma = float(kind.split("_")[1])
        return np.clip(0.5 + sigma * rng.standard_normal(shape), 0, 1).astype(np.float32)
    counts = rng.poisson(5, shape).astype(np.float64)
    low, high = np.percentile(counts, (1, 99))
    return np.clip((counts - low) / max(high - low, 1.0), 0, 1).astype(np.float32)


def measures(inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(spread, structure) of each model input."""
    spread = np.array([sanity.input_spread(x) for x in inputs])
    structure = np.array([sanity.input_structure(x) for x in inputs])
    return spread, structure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(__file__).resolve().parents[2] / "../shared/data"
    default = Path(os.environ.get("BATCHSCAN_DATA", shared))
    parser.add_argument("--data", type=Path, default=default)
    parser.add_argument("--update-card", action="store_true", help="rewrite the shipped card")
    args = parser.parse_args()
    print(f"{'set':26s} {'images':>7s} {'min std':>8s} {'min structure':>14s} {'blank':>6s}")
    films = 0
    for name, inputs in real_sets(args.data):
        spread, structure = measures(inputs)
        blank = sum(sanity.blank_detail(x) is not None for x in inputs)
        films += len(inputs)
        print(f"{name:26s} {len(inputs):7d} {spread.min():8.4f} {structure.min():14.3f} {blank:6d}")
    print(f"({films} real films)")
    rng = np.random.default_rng(0)
    print(f"{'no anatomy (20 per size)':26s} {'sizes':>7s} {'max std':>8s} {'max structure':>14s}")
    for kind in BLANK_KINDS:
        inputs = np.stack(
            [preprocess(blank_picture(kind, s, rng)) for s in SIZES for _ in range(20)]
        )
        spread, structure = measures(inputs)
        blank = sum(sanity.blank_detail(x) is not None for x in inputs)
        print(
            f"{kind:26s} {'28-1024':>7s} {spread.max():8.4f} {structure.max():14.3f} "
            f"{blank:3d}/{len(inputs)}"
        )
    print(
        f"rule {sanity.BLANK_RULE}: blank if std < {sanity.MAX_CONSTANT_SPREAD} or structure "
        f"< {sanity.MIN_STRUCTURE}"
    )
    if args.update_card:
        card_path = Path(models_init).parent / "pneumonia_cnn_seed.json"
        card = json.loads(card_path.read_text())
        train = preprocess_many(np.load(args.data / "pneumoniamnist_28_full.npz")["train_images"])
        card["sanity"] = sanity.describe(
            train, f"train split ({len(train)} images), through batchscan.ingest.preprocess"
        )
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        print(f"wrote the sanity entry of {card_path}")


if __name__ == "__main__":
    main()
