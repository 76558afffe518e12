#!/usr/bin/env python3
"""Where a model takes its evidence: the share of its map's mass inside the lung fields,
on 24 films whose lungs were outlined by hand, for the shipped model and for site models
adapted with and without border erasing (``Levers.erase_borders`` of ``jobs/common/levers.py``:
``batchscan adapt`` has no such option, since it did not help); with the AUC within views on
the later studies (docs/site/adapt.md).

Usage:
    python jobs/experiments/lung_evidence.py [--work DIR] [--data DIR] [--hospitals kermany,shifted]
        [--seeds 1,2,3] [--labelled 1000] [--erase 0.5] [--epochs 30]

Why: report.html's maps of the shipped model's flagged films lie mostly at the chest wall,
the arms, the picture's edge and the side marker, not in the lungs. A model that reads the
lungs is one whose map mass lies in them. The outlines (``tests/data/lung_fields.json``)
are polygons drawn on the 64 x 64 model inputs of 12 normal and 12 pneumonia films of
``kermany_224``'s test split, which are later studies of every simulated hospital of
``jobs/common/hospitals.py`` (this job can share ``jobs/experiments/adapt_levers.py``'s
``--work`` folder: hospitals already scanned and models already adapted there are not made
again). The maps are HiResCAM on the last
convolution layer (:mod:`batchscan.results.saliency`), each scaled to its own maximum; "area" is
the share of the picture the outlines cover, what a map spread evenly would give.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/, for common/
from common.hospitals import UNTIL, scan_hospital, shifted
from common.levers import Levers, adapt

from batchscan.ingest.preprocess import INPUT_SIZE, preprocess

ROOT = Path(__file__).resolve().parents[2]
OUTLINES = ROOT / "tests" / "data" / "lung_fields.json"


def lung_masks(films: list[dict[str, Any]]) -> np.ndarray:
    """(N, 64, 64) booleans: inside either outlined lung of each film."""
    masks = []
    for film in films:
        canvas = Image.new("L", (INPUT_SIZE, INPUT_SIZE), 0)
        draw = ImageDraw.Draw(canvas)
        for polygon in film["lungs"]:
            draw.polygon([tuple(p) for p in polygon], fill=1)
        masks.append(np.asarray(canvas, dtype=bool))
    return np.stack(masks)


def film_inputs(data: Path, films: list[dict[str, Any]], kind: str) -> np.ndarray:
    """The outlined films' model inputs (N, 64, 64, 3) as the hospital `kind` shows them
    (``shifted``: its processing; the later films of the others are the films as they are)."""
    inputs = []
    for film in films:
        picture = np.asarray(Image.open(data / film["path"]).convert("L"))
        if kind == "shifted":
            picture = shifted(picture)
        inputs.append(preprocess(picture.astype(np.float32) / 255.0))
    return np.stack(inputs).astype(np.float32)


def evidence(model_path: Path | None, x: np.ndarray, masks: np.ndarray) -> dict[str, Any]:
    """Map mass inside the lungs, over all the films and over those the model flags."""
    from batchscan.results.saliency import Explainer, mass_in
    from batchscan.scoring.model import load_model

    loaded = load_model(model_path)
    scores = loaded.keras_model.predict(x, verbose=0).reshape(-1)
    heat = Explainer(loaded.keras_model).maps(x)
    share = np.array([mass_in(h, m) for h, m in zip(heat, masks, strict=True)])
    flagged = scores >= loaded.threshold
    return {
        "all": float(share.mean()),
        "flagged": float(share[flagged].mean()) if flagged.any() else None,
        "n_flagged": int(flagged.sum()),
    }


def main(argv: list[str] | None = None) -> int:
    from batchscan.site.adapt import AdaptRequest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", type=Path, help="jobs/experiments/adapt_levers.py's working folder"
    )
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/kermany_224")
    parser.add_argument("--hospitals", default="kermany,shifted")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--labelled", type=int, default=1000)
    parser.add_argument("--erase", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    films = json.loads(OUTLINES.read_text())["films"]
    masks = lung_masks(films)
    print(f"{len(films)} outlined films; the outlines cover {masks.mean():.1%} of the picture")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for kind in args.hospitals.split(","):
            report_dir = scan_hospital(work, args.data, kind)
            x = film_inputs(args.data, films, kind)
            rows.append((kind, "shipped", "-", evidence(None, x, masks), None))
            for seed in (int(s) for s in args.seeds.split(",")):
                for erase in (0.0, args.erase):
                    name = f"s{seed}_{'plain' if erase == 0 else f'erase{erase:g}'}_{args.labelled}"
                    out = work / kind / name
                    if not (out / "adaptation.json").is_file():
                        adapt(
                            AdaptRequest(
                                report_dir=report_dir,
                                until=UNTIL,
                                out=out,
                                seed=seed,
                                epochs=args.epochs,
                                workers=0,
                            ),
                            Levers(max_labelled=args.labelled, erase_borders=erase),
                        )
                    result = json.loads((out / "adaptation.json").read_text())
                    within = result["measured"]["within_views"]["new"]["auc"]
                    found = evidence(out / "site_cnn.keras", x, masks)
                    rows.append((kind, f"erase {erase:g}", seed, found, within))
                    print(f"[{kind} {name}] {found} within views {within:.3f}", flush=True)
    print(
        f"\n{'hospital':9s} {'model':12s} {'seed':>4s} {'in lungs, all':>14s} "
        f"{'in lungs, flagged':>18s} {'within views':>13s}"
    )
    for kind, name, seed, found, within in rows:
        flagged = "n/a" if found["flagged"] is None else f"{found['flagged']:.3f}"
        print(
            f"{kind:9s} {name:12s} {seed!s:>4s} {found['all']:14.3f} "
            f"{flagged + ' (' + str(found['n_flagged']) + ')':>18s} "
            f"{'' if within is None else format(within, '.3f'):>13s}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
