#!/usr/bin/env python3
"""Per-stage cost of the ingest stages on real radiographs (ms per image, median of N runs).

Usage:
    python jobs/experiments/stage_costs.py [--repeat N] [FILE ...]

Default files: pydicom-data's adult chest radiograph RG1 (1955 x 1841, 15 bits,
MONOCHROME1) uncompressed and JPEG 2000 lossless/lossy. Stages as the scan job runs them:
header (read + classify, no pixels), decode (full read + pixel decode), normalize
(modality/VOI LUT, inversion), preprocess (crop, 28 px, 64 px). One process, one image at a
time: the per-core cost that the worker processes divide among the cores.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from batchscan.ingest.decoders import DEFAULT_MIN_EDGE
from batchscan.ingest.dicom import decode_pixels, normalize, read_dataset
from batchscan.ingest.header import StageOptions, read_header
from batchscan.ingest.preprocess import preprocess
from batchscan.ingest.records import ImageRecord

DEFAULT_FILES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")


def _median_ms(action: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = action()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), result


def _header(path: Path) -> ImageRecord:
    return read_header(ImageRecord(path=path.name, abs_path=str(path)), StageOptions())


def _decode(path: Path, min_edge: int | None) -> tuple[Dataset, np.ndarray]:
    ds = read_dataset(str(path))
    return ds, decode_pixels(ds, min_edge)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    files = args.files or [Path(p) for p in map(get_testdata_file, DEFAULT_FILES) if p]
    if not files:
        parser.exit(2, "stage_costs: no files (pip install pydicom-data)\n")
    warnings.simplefilter("ignore")
    print(
        f"{'file':<16} {'decoded at':>10} {'header':>8} {'decode':>8} {'normalize':>10} "
        f"{'preprocess':>11} {'total':>8}  (ms per image, median of {args.repeat})"
    )
    for path in files:
        header_ms, _ = _median_ms(partial(_header, path), args.repeat)
        for min_edge in (None, DEFAULT_MIN_EDGE):
            decode_ms, (ds, arr) = _median_ms(partial(_decode, path, min_edge), args.repeat)
            normalize_ms, image = _median_ms(partial(normalize, arr, ds), args.repeat)
            preprocess_ms, _ = _median_ms(partial(preprocess, image.pixels), args.repeat)
            total = header_ms + decode_ms + normalize_ms + preprocess_ms
            size = f"{arr.shape[0]}x{arr.shape[1]}"
            print(
                f"{path.name:<16} {size:>10} {header_ms:8.2f} {decode_ms:8.1f} "
                f"{normalize_ms:10.1f} {preprocess_ms:11.1f} {total:8.1f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
