#!/usr/bin/env python3
"""What helps a site model: `batchscan adapt` on simulated hospitals, with 100, 300, 1,000
and all labelled studies, with and without SimSiam pretraining or as an ensemble of seed
CNNs, over several seeds (docs/site/adapt.md).

Usage:
    python jobs/experiments/adapt_levers.py [--work DIR] [--data DIR]
        [--hospitals kermany,shifted,marker]
        [--sizes 100,300,1000,all] [--seeds 1,2] [--variants plain,pre,ens3] [--epochs N]
        [--pretrain-views N]
        [--json OUT.json]

Each hospital is built from ``kermany_224`` (the pediatric source of the shipped model's
training data) and written as a DICOM archive of one-image studies with a radiology report
per study (the text says pneumonia or normal as the label does): its train images are the
training period (study dates in 2025, with ``--until 2025-12-31``), its test images the
later studies (2026). PatientID comes from the file names and the scan runs with a
pseudonym key, so the split is by patient. The hospitals:

* ``kermany``: the source as it is (AP and PA assigned at random, half each): the shipped
  model already learned these pictures at 28 px, so adaptation has little to add;
* ``shifted``: the same pictures as another hospital's processing would show them, grey
  levels inverted and contrast flattened (``1 - x ** 0.6``): the shipped model reads them
  backwards;
* ``marker``: in the training period normal films are mostly AP (85 %, 25 % of pneumonia)
  and every AP film carries a burnt-in "AP" marker; later films keep the views without the
  marker (``jobs/experiments/shortcut_check.py``'s hospital).

Each hospital is scanned once, for real (``batchscan scan --reports-file``: the input
store and the report labels are filled); then every configuration is ``batchscan adapt``'s
own :func:`batchscan.site.adapt.run_adaptation` on that REPORT_DIR (``max_labelled`` draws the
labelled training studies with the seed; the pretraining of a seed is shared by the sizes).
The table gives, on the later studies, the AUC pooled within views (mean over seeds, and
each seed's value), the overall AUC, each variant's gain over plain fine-tuning with the
same seed (the same labelled studies and the same split), and how many seeds' verdicts
said deploy. Variants: ``plain``, ``pre`` (SimSiam first), ``ensK`` (K seed CNNs on one split,
``AdaptRequest.ensemble``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shortcut_check import AP_SHARE, with_marker
from site_training_check import _PATIENT, _run, _shifted

from batchscan.synth import DEMO_REPORTS, write_labelled_studies, write_reports

ROOT = Path(__file__).resolve().parents[2]
UNTIL = date(2025, 12, 31)
HOSPITALS = ("kermany", "shifted", "marker")
#: Report texts that the labeler reads as normal and as pneumonia (the hedged one is left out).
REPORT_TEXTS = {
    0: (DEMO_REPORTS[0][0], DEMO_REPORTS[0][1]),
    1: (DEMO_REPORTS[1][0], DEMO_REPORTS[1][2]),
}


def write_hospital(
    target: Path,
    pictures: list[np.ndarray],
    labels: list[int],
    views: list[str],
    patients: list[str],
    later: list[bool],
    *,
    prefix: str = "H",
) -> tuple[Path, Path]:
    """Write a hospital: its archive (one-image DX studies, the earlier ones dated through
    2025, the `later` ones in the first quarter of 2026) and its RIS export (a report per
    study that says what its label says). Returns (archive, reports file)."""
    earlier_n = sum(1 for x in later if not x)
    later_n = len(later) - earlier_n
    dates, e, k = [], 0, 0
    for is_later in later:
        if is_later:
            day = date(2026, 1, 2) + timedelta(days=int(88 * k / max(later_n, 1)))
            k += 1
        else:
            day = date(2025, 1, 1) + timedelta(days=int(364 * e / max(earlier_n, 1)))
            e += 1
        dates.append(day.strftime("%Y%m%d"))
    archive = target / "archive"
    rows = write_labelled_studies(
        archive,
        pictures,
        labels,
        prefix=prefix,
        views=views,
        patient_ids=patients,
        modality="DX",
        study_dates=dates,
    )
    reports = [(a, REPORT_TEXTS[y][i % 2]) for i, (a, y) in enumerate(rows)]
    return archive, write_reports(target / "ris.csv", reports)


def kermany_hospital(
    data: Path, kind: str, target: Path, limit: int | None = None, seed: int = 0
) -> tuple[Path, Path]:
    """One of the simulated hospitals (see the module's description) from ``kermany_224``;
    `limit` keeps that many studies of each period (drawn with `seed`)."""
    with (data / "labels.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    rng = np.random.default_rng(seed)
    chosen = []
    for split in ("train", "test"):
        rows = [r for r in table if r["split"] == split]
        if limit is not None and limit < len(rows):
            rows = [rows[i] for i in sorted(rng.choice(len(rows), limit, replace=False))]
        chosen += rows
    labels = [int(r["label"] == "PNEUMONIA") for r in chosen]
    later = [r["split"] == "test" for r in chosen]
    if kind == "marker":
        views = ["AP" if rng.random() < AP_SHARE[y] else "PA" for y in labels]
    else:
        views = ["AP" if rng.random() < 0.5 else "PA" for _ in labels]
    pictures = []
    for r, view, is_later in zip(chosen, views, later, strict=True):
        picture = np.asarray(Image.open(data / r["path"]).convert("L"))
        if kind == "shifted":
            picture = _shifted(picture)
        elif kind == "marker" and view == "AP" and not is_later:
            picture = with_marker(picture)
        pictures.append(picture)
    patients = []
    for r in chosen:
        match = _PATIENT.search(Path(r["path"]).name)
        patients.append(f"{kind}-{match.group(0) if match else Path(r['path']).stem}")
    return write_hospital(target, pictures, labels, views, patients, later)


def scan_hospital(work: Path, data: Path, kind: str, limit: int | None = None) -> Path:
    """Build and scan a hospital (once: a REPORT_DIR already there is reused)."""
    target = work / kind
    out = target / "reports"
    if (out / "manifest.json").is_file():
        return out
    archive, reports = kermany_hospital(data, kind, target, limit)
    key = target / "pseudonym.key"
    key.write_bytes(os.urandom(32))
    _run(
        "scan", str(archive), "--out", str(out), "--reports-file", str(reports),
        "--pseudonym-key-file", str(key), "--no-progress",
    )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    from batchscan.site.adapt import AdaptRequest, run_adaptation

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/kermany_224")
    parser.add_argument("--hospitals", default=",".join(HOSPITALS))
    parser.add_argument("--sizes", default="100,300,1000,all")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument(
        "--all-seeds", default="1", help="seeds of the 'all labelled' size (the costliest)"
    )
    parser.add_argument(
        "--variants",
        default="plain,pre",
        help="plain (fine-tuning), pre (SimSiam first), ensK (K seed CNNs on one split, "
        "AdaptRequest.ensemble = K)",
    )
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--pretrain-views", type=int, default=40_000)
    parser.add_argument("--limit", type=int, help="studies of each period (default: all)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    sizes = [None if s == "all" else int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    all_seeds = {int(s) for s in args.all_seeds.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs: list[dict[str, Any]] = []
        for kind in args.hospitals.split(","):
            report_dir = scan_hospital(work, args.data, kind, args.limit)
            for seed in seeds:
                for variant in args.variants.split(","):
                    pretrain = variant == "pre"
                    ensemble = int(variant[3:]) if variant.startswith("ens") else 1
                    for n in sizes:
                        if n is None and seed not in all_seeds:
                            continue
                        started = time.perf_counter()
                        name = f"s{seed}_{variant}_{n or 'all'}"
                        kept = work / kind / name / "adaptation.json"
                        if kept.is_file():  # a run of an earlier call with the same work folder
                            r = json.loads(kept.read_text())
                        else:
                            r = run_adaptation(
                                AdaptRequest(
                                    report_dir=report_dir,
                                    until=UNTIL,
                                    out=work / kind / name,
                                    seed=seed,
                                    epochs=args.epochs,
                                    pretrain=pretrain,
                                    pretrain_views=args.pretrain_views,
                                    pretrain_cache=work / kind / f"pretrained_s{seed}.npz",
                                    max_labelled=n,
                                    ensemble=ensemble,
                                    workers=0,
                                )
                            ).result
                        c, w = r["measured"]["comparison"], r["measured"]["within_views"]
                        runs.append(
                            {
                                "hospital": kind,
                                "labelled": n or "all",
                                "train_studies": r["periods"]["training"]["studies"],
                                "pretrain": pretrain,
                                "variant": variant,
                                "seed": seed,
                                "auc": c["shadow"]["auc"],
                                "auc_ci95": c["shadow"]["auc_ci95"],
                                "within": w["new"]["auc"],
                                "within_ci95": w["new"]["auc_ci95"],
                                "in_use_auc": c["model_in_use"]["auc"],
                                "in_use_within": w["in_use"]["auc"],
                                "deploy": r["verdict"]["deploy"],
                                "verdict": r["verdict"]["line"],
                                "points": r["points"],
                                "pretraining": (r["periods"]["pretraining_images"] or None),
                                "seconds": round(time.perf_counter() - started, 1),
                            }
                        )
                        print(
                            f"[{kind} {name}] within {w['new']['auc']:.3f} overall "
                            f"{c['shadow']['auc']:.3f} ({runs[-1]['seconds']} s) "
                            f"{r['verdict']['line'][:90]}",
                            flush=True,
                        )
                        if args.json:
                            args.json.write_text(json.dumps(runs, indent=1, default=str))
    print(
        "\nlater studies: AUC pooled within views, mean over seeds [each seed]; "
        "overall AUC; the gain over plain fine-tuning with the same seed, mean [each]; "
        "the model in use within views; deploy verdicts"
    )
    print(
        f"{'hospital':9s} {'labelled':>8s} {'variant':>8s} {'within views':>26s} "
        f"{'overall':>8s} {'vs plain':>22s} {'in use':>7s} {'deploy':>7s}"
    )
    keys = sorted(
        {(r["hospital"], str(r["labelled"]), r["variant"]) for r in runs},
        key=lambda k: (k[0], k[1] == "all", int(k[1]) if k[1] != "all" else 0, k[2]),
    )
    for kind, n, variant in keys:
        part = [
            r
            for r in runs
            if (r["hospital"], str(r["labelled"]), r["variant"]) == (kind, n, variant)
        ]
        plain = {
            r["seed"]: r["within"]
            for r in runs
            if (r["hospital"], str(r["labelled"]), r["variant"]) == (kind, n, "plain")
        }
        within = [r["within"] for r in part]
        gains = [r["within"] - plain[r["seed"]] for r in part if r["seed"] in plain]
        each = ",".join(f"{v:.3f}" for v in within)
        versus = (
            f"{np.mean(gains):+.3f} [{','.join(f'{g:+.3f}' for g in gains)}]"
            if gains and variant != "plain"
            else ""
        )
        print(
            f"{kind:9s} {n:>8s} {variant:>8s} {np.mean(within):6.3f} [{each}]".ljust(56)
            + f" {np.mean([r['auc'] for r in part]):8.3f} {versus:>22s} "
            f"{part[0]['in_use_within']:7.3f} {sum(r['deploy'] for r in part)}/{len(part)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
