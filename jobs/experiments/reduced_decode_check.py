#!/usr/bin/env python3
"""Does reduced-resolution decoding change the scores? Test split written as DICOM + RG1.

Usage:
    python jobs/experiments/reduced_decode_check.py [--size 1024] [--limit N] [--data PATH.npz]

Writes the PneumoniaMNIST test images as full-size DICOM radiographs (upsampled from 28 px
with Pillow bicubic, 12-bit, MONOCHROME2) in several transfer syntaxes, scores each file
decoded at full resolution and at the scan job's reduced resolution, and prints per syntax
the largest and mean score change and the test AUC both ways; then the same for pydicom-data's
RG1 files. The target (issue #6): every score within 0.005, AUC unchanged beyond noise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
)

from batchscan.engines.pipeline import model_input
from batchscan.ingest.decoders import DEFAULT_MIN_EDGE
from batchscan.ingest.header import StageOptions
from batchscan.scoring.model import load_model
from batchscan.site.metrics import roc_auc
from batchscan.site.training import default_npz_path
from batchscan.synth import RadiographSpec, write_radiograph

SYNTAXES = (
    ExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
)


def _scores(model: object, paths: list[Path], min_edge: int | None) -> np.ndarray:
    options = StageOptions(min_edge=min_edge)
    inputs = np.stack([model_input(p, options) for p in paths])
    return model.predict(inputs, batch_size=256, verbose=0).reshape(-1)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="side of the written images")
    parser.add_argument("--limit", type=int, default=None, help="first N test images only")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--syntaxes", default=None, help="comma-separated UIDs (default: all)")
    args = parser.parse_args(argv)
    data = args.data or default_npz_path(Path(__file__).resolve().parents[2])
    if not data.is_file():
        parser.exit(2, f"reduced_decode_check: data not found: {data}\n")
    warnings.simplefilter("ignore")
    with np.load(data) as arrays:
        images, labels = arrays["test_images"], arrays["test_labels"].reshape(-1)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    model = load_model().keras_model
    worst = 0.0
    print(
        f"test split: {len(images)} images written at {args.size} px; reduced decode to "
        f"short edge >= {DEFAULT_MIN_EDGE}"
    )
    print(
        f"{'syntax':<28} {'window':<10} {'max |d score|':>14} {'mean |d|':>9} {'AUC full':>9} "
        f"{'AUC reduced':>12}"
    )
    with tempfile.TemporaryDirectory() as folder:
        chosen = [s for s in SYNTAXES if not args.syntaxes or s in args.syntaxes.split(",")]
        # with the header's window (as CR/DX files carry) and without (percentile fallback):
        # (JPEG 2000 then estimates the window sample from its band, see batchscan.ingest.sampling)
        for syntax, window in product(chosen, ((2048.0, 4096.0), None)):
            paths = []
            for i, image in enumerate(images):
                big = Image.fromarray(image).resize(
                    (args.size, args.size), Image.Resampling.BICUBIC
                )
                spec = RadiographSpec(transfer_syntax=syntax, bits_stored=12, window=window)
                if syntax == JPEGBaseline8Bit and window is not None:
                    spec.window = (128.0, 256.0)
                path = Path(folder) / f"{i:04d}"
                paths.append(write_radiograph(path, np.asarray(big) / 255.0, spec))
            full, reduced = _scores(model, paths, None), _scores(model, paths, DEFAULT_MIN_EDGE)
            delta = np.abs(full - reduced)
            worst = max(worst, float(delta.max()))
            print(
                f"{syntax.keyword[:28]:<28} {'header' if window else 'percentile':<10} "
                f"{delta.max():14.4f} {delta.mean():9.5f} "
                f"{roc_auc(labels, full):9.4f} {roc_auc(labels, reduced):12.4f}",
                flush=True,
            )
    rg1 = [
        Path(p)
        for p in map(get_testdata_file, ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"))
        if p
    ]
    if rg1:
        delta = np.abs(_scores(model, rg1, None) - _scores(model, rg1, DEFAULT_MIN_EDGE))
        worst = max(worst, float(delta.max()))
        print(
            f"{'RG1 (UNCR, J2KR, J2KI)':<28} {'header':<10} {delta.max():14.4f} {delta.mean():9.5f}"
        )
    print(f"largest score change: {worst:.4f} (target <= 0.005)")
    return 0 if worst <= 0.005 else 1


if __name__ == "__main__":
    sys.exit(main())
