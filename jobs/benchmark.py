#!/usr/bin/env python3
"""Throughput of batchscan against the naive per-file loop, per transfer syntax.

Usage:
    python jobs/benchmark.py [--small 8] [--large 24] [--size 2048] [--syntaxes unc,j2k,...]
    python jobs/benchmark.py --memory [--memory-files 10000]

For each syntax it writes an archive of full-size chest-like radiographs (--size px, 12-bit;
JPEG baseline 8-bit) and measures, in the same run:

  naive    the blog-style loop: for each file dcmread -> pixel_array -> resize to 64 x 64 ->
           model.predict on that one image
  scan     ``batchscan scan`` (the command, as cron runs it; default workers and options)
  full     ``batchscan scan --full-resolution`` (full decode + resize: what reduced-resolution
           decoding is measured against)
  1 worker ``batchscan scan --workers 1``
  decode   the decode limit: cores / one process's per-image cost of a full pydicom decode
  prepare  cores / one process's per-image cost of the scan's per-file stages (header, decode
           at reduced resolution, normalize, preprocess)
  infer    inference alone (images/s of the model on random inputs, batch 256)

Every rate of a command is marginal between an archive of --small files and a larger one,
(large - small) / (t_large - t_small), so start-up (Python, TensorFlow, XLA compile, worker
start) cancels; start-up is reported separately as t_small - small / rate. The larger archive
holds at least --large files and enough for about --seconds of work at the rate the per-image
costs predict (at most --small + --max-files).

--memory: peak RSS of ``batchscan scan`` on archives of a quarter of --memory-files and of
--memory-files files (small uncompressed images, hardlinked), to show it is flat in size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from batchscan.header import StageOptions
from batchscan.model import native_stderr_silenced
from batchscan.pipeline import default_workers, model_input
from batchscan.synth import RadiographSpec, chest_phantom, write_radiograph

SYNTAXES = {
    "unc": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "j2k": JPEG2000Lossless,
    "j2k-lossy": JPEG2000,
    "jpeg": JPEGBaseline8Bit,
    "jpegls": JPEGLSLossless,
}


def write_archive(root: Path, syntax: str, count: int, size: int) -> list[Path]:
    """`count` files in `syntax`: 8 distinct radiographs (half with an opacity), hardlinked.

    Hardlinks keep a large archive cheap to write and store; the files are read from the page
    cache either way, so the benchmark measures CPU cost, not the disk.
    """
    pictures = [chest_phantom(size, seed=i, opacity=0.8 * (i % 2)) for i in range(8)]
    distinct = []
    for i, picture in enumerate(pictures):
        spec = RadiographSpec(transfer_syntax=syntax, bits_stored=12, window=(2048, 4096))
        if syntax == JPEGBaseline8Bit:
            spec.window = (128, 256)
        distinct.append(write_radiograph(root / "distinct" / f"{i:05d}", picture, spec))
    return [link(distinct[i % len(distinct)], root / "all" / f"{i:05d}") for i in range(count)]


def link(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.link(source, target)
    return target


def subset(paths: list[Path], count: int, root: Path) -> Path:
    """A folder of hardlinks to the first `count` files (same bytes, no copy)."""
    for path in paths[:count]:
        link(path, root / path.name)
    return root


def sizes(args: argparse.Namespace, seconds_per_file: float) -> tuple[int, int]:
    """(small, large) archive sizes whose difference takes about --seconds to process.

    A fixed difference would be lost in the noise of start-up for cheap syntaxes and take
    minutes for expensive ones; the estimate comes from the per-image costs measured first.
    """
    extra = round(args.seconds / max(seconds_per_file, 1e-6))
    return args.small, args.small + max(args.large - args.small, min(extra, args.max_files))


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def marginal(n_small: int, t_small: float, n_large: int, t_large: float) -> tuple[float, float]:
    """(rate in files/s, start-up s) from two timed runs."""
    rate = (n_large - n_small) / max(t_large - t_small, 1e-9)
    return rate, max(t_small - n_small / rate, 0.0)


def run_scan(archive: Path, out: Path, *extra: str) -> None:
    command = [
        sys.executable,
        "-m",
        "batchscan.cli",
        "scan",
        str(archive),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"scan failed: {result.stderr}")
    shutil.rmtree(out)


def naive_loop(paths: list[Path], model: object) -> None:
    """The original blog-style code: one file, one decode, one predict at a time."""
    for path in paths:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float32)
        pixels = (pixels - pixels.min()) / max(float(pixels.max() - pixels.min()), 1.0)
        small = np.asarray(Image.fromarray(pixels, mode="F").resize((64, 64)), np.float32)
        model.predict(np.repeat(small[None, :, :, None], 3, axis=3), verbose=0)  # type: ignore[attr-defined]


def per_image_seconds(paths: list[Path], action: Callable[[Path], object]) -> float:
    action(paths[0])  # warm caches and imports
    return min(timed(lambda p=p: action(p)) for p in paths[: min(len(paths), 6)])


def inference_rate(batch: int = 256, count: int = 4096) -> float:
    from batchscan.infer import Scorer
    from batchscan.model import load_model

    scorer = Scorer(load_model(), batch)
    inputs = np.random.default_rng(0).random((count, 64, 64, 3), dtype=np.float32)
    scorer.score(inputs[:batch])  # compile
    return count / timed(lambda: scorer.score(inputs))


def measure_syntax(name: str, args: argparse.Namespace, cores: int, model: object) -> str:
    """One table row: every rate for one transfer syntax, on a fresh archive."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        paths = write_archive(root, SYNTAXES[name], args.small + args.max_files, args.size)
        decode_s = per_image_seconds(paths, lambda p: pydicom.dcmread(p).pixel_array)
        prepare_s = per_image_seconds(paths, partial(model_input, options=StageOptions()))
        full_options = StageOptions(min_edge=None)
        full_s = per_image_seconds(paths, partial(model_input, options=full_options))
        out = root / "out"
        estimates = {  # seconds per file, to size the archives
            "naive": decode_s + 0.04,
            "scan": prepare_s / cores,
            "full": full_s / cores,
            "one": prepare_s,
        }
        rates = {}
        for key, extra in (
            ("naive", None),
            ("scan", ()),
            ("full", ("--full-resolution",)),
            ("one", ("--workers", "1")),
        ):
            n_small, n_large = sizes(args, estimates[key])
            if extra is None:
                t_small = timed(partial(naive_loop, paths[:n_small], model))
                t_large = timed(partial(naive_loop, paths[:n_large], model))
            else:
                small = subset(paths, n_small, root / f"{key}-small")
                large = subset(paths, n_large, root / f"{key}-large")
                t_small = timed(partial(run_scan, small, out, *extra))
                t_large = timed(partial(run_scan, large, out, *extra))
            rates[key] = marginal(n_small, t_small, n_large, t_large)
    scan, naive, full, one = (rates[k][0] for k in ("scan", "naive", "full", "one"))
    decode_limit, prepare_limit = cores / decode_s, cores / prepare_s
    return (
        f"{name:<10} {naive:7.1f} {scan:7.1f} {scan / naive:8.1f} {full:7.1f} "
        f"{scan / full:7.1f} {one:9.1f} {scan / one:6.2f} {decode_limit:7.1f} "
        f"{scan / decode_limit:6.2f} {prepare_limit:8.1f} {rates['scan'][1]:8.1f}"
    )


def benchmark(args: argparse.Namespace) -> None:
    from batchscan.model import load_model

    warnings.simplefilter("ignore")
    cores = default_workers()
    model = load_model().keras_model
    print(
        f"# {args.size} x {args.size} px radiographs; {cores} cores; images/s, marginal "
        f"between {args.small} files and enough more for ~{args.seconds:g} s of work"
    )
    print(f"inference alone (batch 256, XLA): {inference_rate():.0f} images/s")
    print(
        f"{'syntax':<10} {'naive':>7} {'scan':>7} {'x naive':>8} {'full':>7} "
        f"{'x full':>7} {'1 worker':>9} {'2w/1w':>6} {'decode':>7} {'x dec':>6} "
        f"{'prepare':>8} {'start s':>8}"
    )
    for name in args.syntaxes.split(","):
        print(measure_syntax(name, args, cores, model), flush=True)


def memory(args: argparse.Namespace) -> None:
    """Peak RSS of the scan on two archive sizes (each run in a fresh process)."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        seeds = write_archive(root / "seeds", ExplicitVRLittleEndian, 8, 128)
        big, quarter = root / "big", root / "quarter"
        for i in range(args.memory_files):
            for archive in (big, quarter) if i < args.memory_files // 4 else (big,):
                target = archive / f"{i // 1000:03d}" / f"{i:06d}"
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(seeds[i % len(seeds)], target)
        print(f"{'files':>8} {'seconds':>8} {'peak RSS MiB (largest process)':>32}")
        for archive, count in ((quarter, args.memory_files // 4), (big, args.memory_files)):
            code = (
                "import resource, sys; from batchscan.cli import main; "
                f"rc = main(['scan', {str(archive)!r}, '--out', {str(root / 'out')!r}, "
                "'--no-progress']); "
                "own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
                "kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
                "print(max(own, kids), file=sys.stderr); sys.exit(rc)"
            )
            start = time.perf_counter()
            result = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            seconds = time.perf_counter() - start
            if result.returncode != 0:
                raise RuntimeError(result.stderr)
            peak_kib = int(result.stderr.strip().splitlines()[-1])
            print(f"{count:8d} {seconds:8.1f} {peak_kib / 1024:32.0f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=8)
    parser.add_argument("--large", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--max-files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--syntaxes", default=",".join(SYNTAXES))
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--memory-files", type=int, default=10_000)
    args = parser.parse_args(argv)
    if args.memory:
        memory(args)
    else:
        with native_stderr_silenced():  # TensorFlow's C++ start-up and XLA lines
            benchmark(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
