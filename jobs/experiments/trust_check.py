#!/usr/bin/env python3
"""How far the scores can be trusted, measured through the real pipeline (the figures of
docs/what-is-scored.md).

Usage:
    python jobs/experiments/trust_check.py [--work DIR] [--adults N] [--data DIR]

Writes, as DICOM studies under --work (default: a temporary folder), and scans with
``batchscan scan``:

* ``pediatric``: the PneumoniaMNIST test split (624 images, the in-distribution reference;
  AP, CR, age unknown), then ``batchscan evaluate`` with its labels;
* ``inverted``: the same pictures with their grey levels inverted (a MONOCHROME1 image
  read the wrong way round);
* ``adult``: N adult radiographs read as normal (``adult_normal_rsna_128``, with their real
  age, sex and view);
* ``pydicom``: pydicom's own test files, with ``--all-modalities`` (CT, MR, US, ... : the
  non-chest images; radiographs of the chest are left out of this set).

It prints the AUROC of ``ood_score`` for telling each set from the pediatric one, the share
marked ``ood``, the share flagged and the domain counts. Nothing here is fitted: the OOD
statistics and the threshold come from the shipped model card.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.data import get_testdata_file

from batchscan.site import metrics
from batchscan.site.training import NPZ_NAME
from batchscan.synth import write_labelled_studies, write_labels

ROOT = Path(__file__).resolve().parents[2]


def _batchscan(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "batchscan.cli", *args], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"batchscan {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def _scan(archive: Path, reports: Path, *extra: str) -> tuple[pd.DataFrame, dict]:
    _batchscan("scan", str(archive), "--out", str(reports), "--no-progress", *extra)
    images = pd.read_parquet(reports / "images.parquet")
    manifest = json.loads((reports / "manifest.json").read_text())
    return images[images["status"] == "scored"], manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--adults", type=int, default=1000)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="batchscan-trust-"))
    with np.load(args.data / NPZ_NAME) as data:
        test_images, test_labels = data["test_images"], data["test_labels"].reshape(-1)

    sets: dict[str, tuple[pd.DataFrame, dict]] = {}
    rows = write_labelled_studies(work / "pediatric", test_images, test_labels, prefix="PED")
    labels_file = write_labels(work / "pediatric_labels.csv", rows)
    sets["pediatric"] = _scan(work / "pediatric", work / "reports_pediatric")
    print(_batchscan("evaluate", str(work / "reports_pediatric"), "--labels", str(labels_file)))

    write_labelled_studies(work / "inverted", 255 - test_images, test_labels, prefix="INV")
    sets["inverted"] = _scan(work / "inverted", work / "reports_inverted")

    adult_dir = args.data / "adult_normal_rsna_128"
    with (adult_dir / "labels.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    pick = np.random.default_rng(0).choice(len(table), min(args.adults, len(table)), False)
    chosen = [table[i] for i in sorted(pick)]
    pictures = [np.asarray(Image.open(adult_dir / r["path"]).convert("L")) for r in chosen]
    write_labelled_studies(
        work / "adult",
        pictures,
        [0] * len(chosen),
        prefix="ADU",
        views=[r["view"] for r in chosen],
        ages=[f"{min(int(float(r['age'])), 999):03d}Y" for r in chosen],
    )
    sets["adult"] = _scan(work / "adult", work / "reports_adult")

    pydicom_files = Path(str(get_testdata_file("CT_small.dcm"))).parent
    scored, manifest = _scan(pydicom_files, work / "reports_pydicom", "--all-modalities")
    chest = scored["body_part"].fillna("").str.contains("CHEST") | scored["modality"].isin(
        ["CR", "DX"]
    )
    sets["pydicom non-chest"] = (scored[~chest], manifest)

    reference = sets["pediatric"][0]["ood_score"].to_numpy()
    print(
        "| set | images | AUROC of ood_score vs pediatric | ood | flagged "
        "| studies in domain / out / undecided |"
    )
    print("|---|---|---|---|---|---|")
    for name, (images, manifest) in sets.items():
        values = images["ood_score"].to_numpy()
        auroc = (
            metrics.roc_auc(
                np.r_[np.zeros(len(reference)), np.ones(len(values))], np.r_[reference, values]
            )
            if name != "pediatric" and len(values)
            else None
        )
        threshold = manifest["model"]["threshold"]
        print(
            f"| {name} | {len(values)} | {'-' if auroc is None else f'{auroc:.3f}'} | "
            f"{images['ood'].mean():.1%} | {(images['score'] >= threshold).mean():.1%} | "
            f"{manifest['studies_in_domain']} / {manifest['studies_out_of_domain']} / "
            f"{manifest['studies_domain_unknown']} |"
        )
    print(f"\n(work folder: {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
