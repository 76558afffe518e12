#!/usr/bin/env python3
"""A hospital whose view tracks the label, with a marker only in the training period:
``batchscan train`` with and without ``--balance view`` (docs/site/train.md's figures).

Usage:
    python jobs/experiments/shortcut_check.py [--work DIR] [--data DIR] [--train 2000] [--epochs N]

Built from ``kermany_224``: its train images are the hospital's labelled training period,
its test images its later studies, all written as one-image DICOM studies (PatientID from
the file names, so the split is by patient). In the training period **normal films are
mostly AP** (85 %, against 25 % of pneumonia films) **and every AP film carries a visible
"AP" marker** burnt into its corner, as some devices print it; later studies keep the same
views but no marker (a new device, or a new setting). A model that learned "marker means
normal" learned the view, not the lungs.

Then, every step the real command: ``batchscan train`` fine-tuned from the shipped model and
from scratch, each without and with ``--balance view`` (all reusing the first run's
model-input cache), ``batchscan scan`` of the later studies with each model and the shipped
one, and ``batchscan evaluate`` on their labels, whose shortcut check gives the AUC within
views. The shipped model already learned these pictures (PneumoniaMNIST is Kermany at 28 px),
so fine-tuning starts from a model that reads their lungs; from scratch nothing does.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/, for common/
from common.hospitals import AP_SHARE, patient_ids, run_batchscan, with_marker

from batchscan.synth import write_labelled_studies, write_labels

ROOT = Path(__file__).resolve().parents[2]


def write_period(
    data: Path, split: str, target: Path, prefix: str, limit: int | None, marker: bool
) -> tuple[Path, dict[str, int]]:
    """One period of the hospital: its studies written as DICOM, and their labels file."""
    with (data / "labels.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == split]
    rng = np.random.default_rng(11 if marker else 12)
    if limit is not None and limit < len(rows):
        rows = [rows[i] for i in sorted(rng.choice(len(rows), limit, replace=False))]
    labels = [int(r["label"] == "PNEUMONIA") for r in rows]
    views = ["AP" if rng.random() < AP_SHARE[y] else "PA" for y in labels]
    pictures = []
    for r, view in zip(rows, views, strict=True):
        picture = np.asarray(Image.open(data / r["path"]).convert("L"))
        pictures.append(with_marker(picture) if marker and view == "AP" else picture)
    patients = patient_ids((r["path"] for r in rows), prefix)
    archive = target / f"{prefix}_archive"
    written = write_labelled_studies(
        archive, pictures, labels, prefix=prefix, views=views, patient_ids=patients, modality="DX"
    )
    labels_path = write_labels(target / f"{prefix}_labels.csv", written)
    counts = {
        f"{v} {'pneumonia' if y else 'normal'}": sum(
            1 for yy, vv in zip(labels, views, strict=True) if (yy, vv) == (y, v)
        )
        for v in ("AP", "PA")
        for y in (0, 1)
    }
    return labels_path, counts


def evaluate(work: Path, model: Path | None, name: str, later: Path, labels: Path) -> dict:
    """Scan the later studies with `model` (None: the shipped one) and evaluate them."""
    reports = work / f"reports_{name}"
    extra = ["--model", str(model)] if model is not None else []
    run_batchscan("scan", str(later), "--out", str(reports), "--no-progress", *extra)
    run_batchscan("evaluate", str(reports), "--labels", str(labels))
    result = json.loads((reports / "evaluation.json").read_text())
    view = result["shortcuts"]["attributes"]["view"]
    per_view = result["subgroups"]["view"]
    return {
        "auc": result["overall"]["auc"],
        "within": view["within_auc"],
        "AP": per_view.get("AP", {}).get("auc"),
        "PA": per_view.get("PA", {}).get("auc"),
        "view_alone": view["attribute_auc"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/kermany_224")
    parser.add_argument("--train", type=int, default=2000, help="training-period studies")
    parser.add_argument("--epochs", type=int, default=None, help="passed to batchscan train")
    parser.add_argument("--seed", type=int, default=None, help="passed to batchscan train")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        train_labels, train_counts = write_period(args.data, "train", work, "H", args.train, True)
        later_labels, later_counts = write_period(args.data, "test", work, "L", None, False)
        print(f"training period (AP films marked): {train_counts}")
        print(f"later studies (no marker): {later_counts}")
        models = work / "models"
        epochs = ["--epochs", str(args.epochs)] if args.epochs else []
        epochs += ["--seed", str(args.seed)] if args.seed is not None else []
        base = ["train", str(work / "H_archive"), "--labels", str(train_labels)]
        base += ["--out", str(models), "--no-progress", *epochs]
        cache = ["--cache", str(models / "inputs.npz")]
        runs = {
            "fine-tuned": ("plain", []),
            "fine-tuned --balance view": ("balanced", ["--balance", "view"]),
            "from scratch": ("scratch", ["--from-scratch"]),
            "from scratch --balance view": (
                "scratch_balanced",
                ["--from-scratch", "--balance", "view"],
            ),
        }
        later = work / "L_archive"
        rows = {"shipped": evaluate(work, None, "shipped", later, later_labels)}
        for label, (name, extra) in runs.items():
            text = run_batchscan(*base, "--name", name, *cache, *extra)
            print(f"[{label}] " + " | ".join(text.strip().splitlines()[-2:]))
            rows[label] = evaluate(work, models / f"{name}.keras", name, later, later_labels)
    print("\nlater studies (no marker):")
    print(f"{'model':28s} {'AUC':>6s} {'within views':>13s} {'AP':>6s} {'PA':>6s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['auc']:6.3f} {r['within']:13.3f} {r['AP']:6.3f} {r['PA']:6.3f}")
    print(f"view alone predicts the later labels at AUC {rows['shipped']['view_alone']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
