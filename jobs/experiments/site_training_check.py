#!/usr/bin/env python3
"""`batchscan train` shown on a hospital-like labelled archive (docs/site/train.md's figures).

Usage:
    python jobs/experiments/site_training_check.py [--work DIR] [--data DIR] [--adults 1000]
        [--shifted 300] [--limit N] [--epochs N]

Treats ``kermany_224`` as a hospital's labelled archive: writes its images as one-image DICOM
studies (accession numbers, PatientID from the file names so that the split is by patient;
AP, CR, age unknown), trains on its train split with ``batchscan train`` (fine-tuned from the
shipped model, then from scratch, the second reusing the first's model-input cache),
evaluates the shipped model and both new ones on its test split with ``batchscan evaluate``,
and scores N adult radiographs read as normal (``adult_normal_rsna_128``) with each, to show
what training does to flags on normal adults.

Then a hospital the shipped model does not know (``--shifted`` labelled studies): the same
pictures as its processing would show them, grey levels inverted and contrast flattened
(``1 - x ** 0.6``), a few hundred of its train studies labelled, its test studies as the
later ones: shipped model against fine-tuning on those few hundred. Every step is the real
command.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/, for common/
from common.hospitals import patient_ids, run_batchscan, shifted

from batchscan.scoring.model import default_model_path
from batchscan.synth import write_labelled_studies, write_labels

ROOT = Path(__file__).resolve().parents[2]


def _write_split(
    data: Path,
    split: str,
    target: Path,
    prefix: str,
    limit: int | None = None,
    shift: bool = False,
) -> Path:
    with (data / "labels.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == split]
    if limit is not None:
        rows = [rows[i] for i in sorted(np.random.default_rng(0).choice(len(rows), limit, False))]
    pictures = [np.asarray(Image.open(data / r["path"]).convert("L")) for r in rows]
    if shift:
        pictures = [shifted(p) for p in pictures]
    labels = [int(r["label"] == "PNEUMONIA") for r in rows]
    patients = patient_ids((r["path"] for r in rows), prefix)
    written = write_labelled_studies(target, pictures, labels, prefix=prefix, patient_ids=patients)
    return write_labels(target.parent / f"{target.name}_labels.csv", written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--adults", type=int, default=1000)
    parser.add_argument("--shifted", type=int, default=300)
    parser.add_argument("--limit", type=int, help="studies of each split (default: all)")
    parser.add_argument("--epochs", type=int, help="passed to batchscan train")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="batchscan-train-"))
    kermany = args.data / "kermany_224"
    train_labels = _write_split(kermany, "train", work / "hospital_train", "KTR", args.limit)
    test_labels = _write_split(kermany, "test", work / "hospital_test", "KTE", args.limit)

    adult_dir = args.data / "adult_normal_rsna_128"
    with (adult_dir / "labels.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    pick = np.random.default_rng(0).choice(len(table), min(args.adults, len(table)), False)
    chosen = [table[i] for i in sorted(pick)]
    write_labelled_studies(
        work / "adults",
        [np.asarray(Image.open(adult_dir / r["path"]).convert("L")) for r in chosen],
        [0] * len(chosen),
        prefix="ADU",
        views=[r["view"] for r in chosen],
        ages=[f"{int(float(r['age'])):03d}Y" for r in chosen],
    )

    models = work / "models"
    common = ["--labels", str(train_labels), "--out", str(models), "--no-progress"]
    common += ["--epochs", str(args.epochs)] if args.epochs else []
    print(run_batchscan("train", str(work / "hospital_train"), *common, "--name", "finetuned"))
    print(
        run_batchscan(
            "train",
            str(work / "hospital_train"),
            *common,
            "--name",
            "scratch",
            "--from-scratch",
            "--cache",
            str(models / "finetuned.inputs.npz"),
        )
    )
    candidates = {
        "shipped": default_model_path(),
        "fine-tuned": models / "finetuned.keras",
        "from scratch": models / "scratch.keras",
    }
    lines = [
        "| model | test AUC (95 % CI) | sensitivity | specificity | threshold "
        "| normal adults flagged | normal adults `ood` |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, model in candidates.items():
        slug = name.replace(" ", "_")
        reports = work / f"reports_test_{slug}"
        run_batchscan(
            "scan", str(work / "hospital_test"), "--out", str(reports), "--model", str(model)
        )
        print(run_batchscan("evaluate", str(reports), "--labels", str(test_labels)))
        result = json.loads((reports / "evaluation.json").read_text())
        o = result["overall"]
        adults = work / f"reports_adults_{slug}"
        run_batchscan("scan", str(work / "adults"), "--out", str(adults), "--model", str(model))
        studies = pd.read_parquet(adults / "studies.parquet")
        images = pd.read_parquet(adults / "images.parquet")
        scored = images[images["status"] == "scored"]
        lines.append(
            f"| {name} | {o['auc']:.3f} ({o['auc_ci95'][0]:.3f}-{o['auc_ci95'][1]:.3f}) | "
            f"{o['sensitivity']:.3f} | {o['specificity']:.3f} | "
            f"{result['model']['threshold']:.3f} | {studies['flag'].mean():.1%} | "
            f"{scored['ood'].mean():.1%} |"
        )
    print("\n".join(lines))

    shifted_train = _write_split(
        kermany, "train", work / "shifted_train", "STR", args.shifted, True
    )
    shifted_test = _write_split(kermany, "test", work / "shifted_test", "STE", args.limit, True)
    print(
        run_batchscan(
            "train",
            str(work / "shifted_train"),
            "--labels",
            str(shifted_train),
            "--out",
            str(models),
            "--name",
            "shifted",
            "--no-progress",
            *(["--epochs", str(args.epochs)] if args.epochs else []),
        )
        .strip()
        .splitlines()[-1]
    )
    rows = [
        "| model | later studies of the shifted hospital: AUC (95 % CI) | sens / spec |",
        "|---|---|---|",
    ]
    for name, model in (
        ("shipped", default_model_path()),
        ("fine-tuned", models / "shifted.keras"),
    ):
        reports = work / f"reports_shifted_{name}"
        run_batchscan(
            "scan", str(work / "shifted_test"), "--out", str(reports), "--model", str(model)
        )
        run_batchscan("evaluate", str(reports), "--labels", str(shifted_test))
        o = json.loads((reports / "evaluation.json").read_text())["overall"]
        rows.append(
            f"| {name} | {o['auc']:.3f} ({o['auc_ci95'][0]:.3f}-{o['auc_ci95'][1]:.3f}) | "
            f"{o['sensitivity']:.3f} / {o['specificity']:.3f} |"
        )
    print("\n".join(rows))
    print(f"\n(work folder: {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
