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

The hospitals (``kermany``, ``shifted``, ``marker``) are those of
``jobs/common/hospitals.py``: each a DICOM archive of one-image studies with a radiology
report per study, its train images the training period (dated 2025, ``--until 2025-12-31``),
its test images the later studies (2026), PatientID from the file names and a pseudonym key
for the scan, so the split is by patient.

Each hospital is scanned once, for real (``batchscan scan --reports-file``: the input
store and the report labels are filled); then every configuration is ``batchscan adapt``'s
own steps on that REPORT_DIR with the levers of ``jobs/common/levers.py`` in between
(``max_labelled`` draws the labelled training studies with the seed; the pretraining of a
seed is shared by the sizes).
The table gives, on the later studies, the AUC pooled within views (mean over seeds, and
each seed's value), the overall AUC, each variant's gain over plain fine-tuning with the
same seed (the same labelled studies and the same split), and how many seeds' verdicts
said deploy. Variants: ``plain``, ``pre`` (SimSiam first), ``ensK`` (K seed CNNs on one split,
``Levers.ensemble``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/, for common/
from common.hospitals import HOSPITALS, UNTIL, scan_hospital
from common.levers import Levers, adapt

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    from batchscan.site.adapt import AdaptRequest

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
        "Levers.ensemble = K)",
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
                            r = adapt(
                                AdaptRequest(
                                    report_dir=report_dir,
                                    until=UNTIL,
                                    out=work / kind / name,
                                    seed=seed,
                                    epochs=args.epochs,
                                    pretrain=pretrain,
                                    pretrain_views=args.pretrain_views,
                                    workers=0,
                                ),
                                Levers(
                                    max_labelled=n,
                                    pretrain_cache=work / kind / f"pretrained_s{seed}.npz",
                                    ensemble=ensemble,
                                ),
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
