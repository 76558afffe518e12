#!/usr/bin/env python3
"""A base trained at the 64 x 64 the design asks for, beside the shipped base trained at 28 px.

Usage:
    python jobs/experiments/base64_check.py [--data DIR] [--adults N] [--sizes 300,1000]
        [--adapt-seeds 1,2] [--no-control] [--epochs N] [--json OUT.json]

The shipped model learned PneumoniaMNIST: Kermany et al.'s pediatric films, centre-cropped
and reduced to 28 x 28 px, then upsampled to the model's 64 x 64 input. ``kermany_224`` holds
the same films at 224 px, so a base can learn them at 64 x 64 through the same preprocessing
function (``batchscan.ingest.preprocess.preprocess`` with ``size=64``: centre crop, one
resize to 64 x 64, no 28 px step). That copy's owner squashed every film to a square
without keeping its aspect ratio (landscape originals, 1.0-2.0:1), and the squash is not
the same for both classes (median 1.25 for normal films, 1.5 for pneumonia, measured
below): a model could learn the squash. So each film's ratio is measured first, by
matching its centre crops at 21 ratios (1.0-2.0) to the PneumoniaMNIST pictures of the same
split (the best correlation; films that match nothing at 0.97 or more are left out, and
counted), and the film is un-squashed: its centre square in the original geometry (the
middle 224 / ratio columns) stretched back to a square. Both preprocessings then see what
they would see on the original film.

Three bases (``--no-control`` drops the third):

* ``shipped 28 px``: the shipped model, as it is;
* ``64 px``: trained from scratch on the un-squashed ``kermany_224`` train films at 64 px
  (validation: 10 % of the patients, by the file names' patient numbers), with the shipped
  model's training configuration (``TrainConfig()``);
* ``28 px, same films``: the same films, split and configuration at 28 px (the control: it
  separates the resolution from the change of copy).

Measured on the same held-out data: the PneumoniaMNIST test split (624 films at 28 px; the
64 px base sees them upsampled to 64 px, as its preprocessing makes them), the un-squashed
``kermany_224`` test films (each base through its own preprocessing), and the adult films
read as normal (``adult_normal_rsna_128``, ``--adults`` drawn with seed 0): the share a
base leaves below its threshold. Then adaptation: each base fine-tuned as ``batchscan adapt``
fine-tunes (``FINE_TUNE_LEARNING_RATE``, early stopping on 20 % of the patients) on
``--sizes`` labelled films of the shifted hospital (``jobs/common/hospitals.py``:
grey levels inverted and flattened, ``1 - x ** 0.6``) drawn with each ``--adapt-seeds`` seed
from the train films, and measured on the shifted test films. (``batchscan adapt`` itself cannot
run from the 64 px base: the scan and its input store make the shipped 28 px inputs only.)
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/, for common/
from common.hospitals import patient_of, shifted

from batchscan.ingest.preprocess import INPUT_SIZE, SOURCE_SIZE, preprocess_many
from batchscan.scoring.model import load_model
from batchscan.site import metrics
from batchscan.site.site_training import FINE_TUNE_LEARNING_RATE
from batchscan.site.training import Dataset, TrainConfig, predict_scores, train

ROOT = Path(__file__).resolve().parents[2]
RATIOS = np.round(np.arange(1.0, 2.001, 0.05), 2)
#: Correlation with a PneumoniaMNIST picture below which a film's ratio is not trusted.
MIN_MATCH = 0.97


def _centre(picture: np.ndarray, ratio: float) -> np.ndarray:
    """The middle 224 / ratio columns of a squashed square film: its original centre square."""
    width = max(1, round(picture.shape[1] / ratio))
    left = (picture.shape[1] - width) // 2
    return picture[:, left : left + width]


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = rows.reshape(len(rows), -1).astype(np.float32)
    rows -= rows.mean(axis=1, keepdims=True)
    return rows / (np.linalg.norm(rows, axis=1, keepdims=True) + 1e-6)


def measure_ratios(films: list[np.ndarray], reference: np.ndarray) -> np.ndarray:
    """(N, 2): each film's aspect ratio and its best correlation with a `reference` picture
    (PneumoniaMNIST, 28 x 28) over the centre crops at :data:`RATIOS`."""
    targets = _unit(reference)
    out = np.empty((len(films), 2))
    for start in range(0, len(films), 400):
        chunk = films[start : start + 400]
        crops = np.stack(
            [
                np.asarray(
                    Image.fromarray(_centre(f, r)).resize((28, 28), Image.Resampling.BICUBIC),
                    np.float32,
                )
                for f in chunk
                for r in RATIOS
            ]
        )
        best = (_unit(crops) @ targets.T).max(axis=1).reshape(len(chunk), len(RATIOS))
        out[start : start + len(chunk), 0] = RATIOS[best.argmax(axis=1)]
        out[start : start + len(chunk), 1] = best.max(axis=1)
    return out


def unsquash(film: np.ndarray, ratio: float) -> np.ndarray:
    """The film's centre square in its original geometry, as a square uint8 picture."""
    side = film.shape[0]
    square = Image.fromarray(_centre(film, ratio)).resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.uint8)


def _patient_split(patients: np.ndarray, share: float, seed: int) -> np.ndarray:
    """True for the validation part: `share` of the patients, drawn with `seed`."""
    unique = np.unique(patients)
    chosen = np.random.default_rng(seed).choice(
        unique, max(1, round(share * len(unique))), replace=False
    )
    return np.isin(patients, chosen)


def _figures(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    split = metrics.split_metrics(labels, scores, threshold)
    return {
        "n": split.n,
        "auc": split.auc,
        "auc_ci95": list(split.auc_ci95),
        "sensitivity": split.sensitivity,
        "specificity": split.specificity,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--adults", type=int, default=2000)
    parser.add_argument("--sizes", default="300,1000")
    parser.add_argument("--adapt-seeds", default="1,2")
    parser.add_argument("--no-control", action="store_true")
    parser.add_argument(
        "--epochs", type=int, help="at most N epochs per training (default: 60 a base, 30 adapting)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    kermany = args.data / "kermany_224"
    with (kermany / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    films = [np.asarray(Image.open(kermany / r["path"]).convert("L")) for r in rows]
    labels = np.array([r["label"] == "PNEUMONIA" for r in rows], dtype=np.int64)
    splits = np.array([r["split"] for r in rows])
    patients = np.array([patient_of(r["path"]) or r["path"] for r in rows])
    mnist = np.load(args.data / "pneumoniamnist_28_full.npz")
    measured = np.empty((len(rows), 2))
    for split, keys in (("train", ("train", "val")), ("test", ("test",))):
        at = np.flatnonzero(splits == split)
        reference = np.concatenate([mnist[f"{k}_images"] for k in keys])
        measured[at] = measure_ratios([films[i] for i in at], reference)
    kept = measured[:, 1] >= MIN_MATCH
    ratio_facts = {
        name: {
            "films": int((labels == c).sum()),
            "matched": int(((labels == c) & kept).sum()),
            "ratio_quartiles": np.percentile(measured[(labels == c) & kept, 0], [25, 50, 75])
            .round(2)
            .tolist(),
        }
        for c, name in ((0, "normal"), (1, "pneumonia"))
    }
    print(f"aspect ratios, matched to PneumoniaMNIST: {json.dumps(ratio_facts)}", flush=True)
    pictures = np.stack([unsquash(f, r) for f, r in zip(films, measured[:, 0], strict=True)])

    train_at = np.flatnonzero((splits == "train") & kept)
    test_at = np.flatnonzero((splits == "test") & kept)
    is_val = _patient_split(patients[train_at], 0.1, 1234)
    parts = {"train": train_at[~is_val], "val": train_at[is_val], "test": test_at}

    adult_dir = args.data / "adult_normal_rsna_128"
    with (adult_dir / "labels.csv").open(newline="") as handle:
        adult_rows = list(csv.DictReader(handle))
    pick = np.random.default_rng(0).choice(
        len(adult_rows), min(args.adults, len(adult_rows)), False
    )
    adults = [np.asarray(Image.open(adult_dir / adult_rows[i]["path"]).convert("L")) for i in pick]
    mnist_test = mnist["test_images"]
    mnist_y = mnist["test_labels"].reshape(-1).astype(np.int64)

    def inputs(size: int, at: np.ndarray, shift: bool = False) -> np.ndarray:
        chosen = pictures[at]
        return preprocess_many([shifted(p) for p in chosen] if shift else chosen, size=size)

    bases: dict[str, dict[str, Any]] = {}
    shipped = load_model()
    bases["shipped 28 px"] = {
        "size": SOURCE_SIZE,
        "model": shipped.keras_model,
        "threshold": shipped.threshold,
    }
    for name, size in (("64 px", INPUT_SIZE), ("28 px, same films", SOURCE_SIZE)):
        if size == SOURCE_SIZE and args.no_control:
            continue
        data = Dataset(
            x={s: inputs(size, at) for s, at in parts.items()},
            y={s: labels[at] for s, at in parts.items()},
            name=f"kermany_224 un-squashed, {size} px",
            sha256=None,
            source=str(kermany),
        )
        model, report = train(
            data, TrainConfig(verbose=0, **({"epochs": args.epochs} if args.epochs else {}))
        )
        bases[name] = {"size": size, "model": model, "threshold": report["threshold"]}
        print(f"trained {name}: {report['epochs_run']} epochs, {report['train_seconds']} s")

    table: dict[str, Any] = {"ratios": ratio_facts, "left_out_unmatched": int((~kept).sum())}
    for name, base in bases.items():
        size, model, threshold = base["size"], base["model"], base["threshold"]
        adult_scores = predict_scores(model, preprocess_many(adults, size=size))
        later = inputs(size, test_at, shift=True)
        table[name] = {
            "pneumoniamnist_test": _figures(
                predict_scores(model, preprocess_many(mnist_test, size=size)), mnist_y, threshold
            ),
            "kermany_test": _figures(
                predict_scores(model, inputs(size, test_at)), labels[test_at], threshold
            ),
            "adult_normals_specificity": float((adult_scores < threshold).mean()),
            "adults": len(adults),
            "threshold": threshold,
            "shifted_in_use": metrics.roc_auc(labels[test_at], predict_scores(model, later)),
            "adaptation": {},
        }
        for n in [int(s) for s in args.sizes.split(",")]:
            for seed in [int(s) for s in args.adapt_seeds.split(",")]:
                chosen = np.sort(np.random.default_rng(seed).choice(train_at, n, replace=False))
                val = _patient_split(patients[chosen], 0.2, seed)
                data = Dataset(
                    x={
                        "train": inputs(size, chosen[~val], shift=True),
                        "val": inputs(size, chosen[val], shift=True),
                        "test": later,
                    },
                    y={
                        "train": labels[chosen[~val]],
                        "val": labels[chosen[val]],
                        "test": labels[test_at],
                    },
                    name="shifted hospital",
                    sha256=None,
                    source="kermany_224",
                )
                config = TrainConfig(
                    epochs=args.epochs or 30, learning_rate=FINE_TUNE_LEARNING_RATE, patience=8,
                    seed=seed,
                    verbose=0,
                )  # fmt: skip
                adapted, report = train(data, config, base=model)
                scores = predict_scores(adapted, later)
                table[name]["adaptation"][f"{n}/{seed}"] = _figures(
                    scores, labels[test_at], report["threshold"]
                )
                print(
                    f"{name}: adapted on {n} shifted films (seed {seed}): AUC "
                    f"{table[name]['adaptation'][f'{n}/{seed}']['auc']:.3f}",
                    flush=True,
                )

    print(
        f"\n{'base':18s} {'PneumoniaMNIST test AUC':>26s} {'kermany test AUC':>24s} "
        f"{'adult normals spec.':>19s} {'shifted, as is':>14s}  adapted to shifted (size/seed)"
    )
    for name in bases:
        t = table[name]
        p, k = t["pneumoniamnist_test"], t["kermany_test"]
        adapted = ", ".join(f"{key} {v['auc']:.3f}" for key, v in t["adaptation"].items())
        print(
            f"{name:18s} {p['auc']:.3f} ({p['auc_ci95'][0]:.3f}-{p['auc_ci95'][1]:.3f})".ljust(46)
            + f" {k['auc']:.3f} ({k['auc_ci95'][0]:.3f}-{k['auc_ci95'][1]:.3f})".rjust(24)
            + f" {t['adult_normals_specificity']:19.3f} {t['shifted_in_use']:14.3f}  {adapted}"
        )
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
