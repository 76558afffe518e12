#!/usr/bin/env python3
"""Throughput of batchscan against the naive per-file loop, per transfer syntax.

Usage:
    python jobs/bench/benchmark.py [--small 8] [--large 24] [--size 2048] [--syntaxes unc,j2k,...]
    python jobs/bench/benchmark.py --memory [--memory-files 10000]
    python jobs/bench/benchmark.py --incremental [--incremental-files 5000]
    python jobs/bench/benchmark.py --isolation [--syntaxes unc,j2k-lossy]
    python jobs/bench/benchmark.py --engines [--syntaxes unc,j2k-lossy]   (needs the ray extra)
    python jobs/bench/benchmark.py --scaling

For each syntax it writes an archive of full-size chest-like radiographs (--size px, 12-bit;
JPEG baseline 8-bit) and measures, in the same run:

  naive    the blog-style loop: for each file dcmread -> pixel_array -> resize to 64 x 64 ->
           model.predict on that one image
  peer     a strong hand-written peer: the same per-file code in a process pool of one
           process per core, model.predict on batches of 256
  scan     ``batchscan scan`` (the command, as cron runs it; default workers and options)
  full     ``batchscan scan --full-resolution`` (full decode + resize: what reduced-resolution
           decoding is measured against)
  1 worker ``batchscan scan --workers 1``
  decode   the decode limit: cores / one process's per-image cost of a full pydicom decode
  codec    the same with the decoder batchscan uses (libjpeg-turbo for JPEG, ...): read the
           file, decode its frame at full resolution, nothing else; `x codec` = scan / codec
  prepare  cores / one process's per-image cost of the scan's per-file stages (header, decode
           at reduced resolution, normalize, preprocess)
  infer    inference alone (images/s of the model on random inputs, batch 256)
  before   with --against DIR: ``batchscan scan`` of the checkout in DIR (e.g. a worktree of
           an older commit) on the same archive, in the same run; `x before` = scan / before

Every rate of a command is marginal between an archive of --small files and a larger one,
(large - small) / (t_large - t_small), so start-up (Python, TensorFlow, XLA compile, worker
start) cancels; start-up is reported separately as t_small - small / rate. The larger archive
holds at least --large files and enough for about --seconds of work at the rate the per-image
costs predict (at most --small + --max-files).

--memory: peak RSS of ``batchscan scan`` on archives of a quarter of --memory-files and of
--memory-files files (small uncompressed images), to show it is flat in archive size.

--isolation: files/s of the per-file stages in batchscan's crash-isolating WorkerPool against
a plain ProcessPoolExecutor over the same tasks (the cost of isolation).

--scaling: the per-file stages in one process against one process per core at once, with
nothing of batchscan between them: the most that N workers can give on this machine.

--engines: the local engine against --engine ray (a local Ray instance on the same cores).

--incremental: the nightly case on --incremental-files files: first run, second run on the
unchanged archive, a run after 2 % of the files were touched, and a run killed half-way
(SIGKILL) then resumed, against the first run's time.
"""

from __future__ import annotations

import argparse
import multiprocessing
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
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from batchscan.engines.pipeline import default_workers, model_input
from batchscan.ingest.decoders import decode_frame
from batchscan.ingest.dicom import read_dataset
from batchscan.ingest.header import StageOptions
from batchscan.scoring.model import native_stderr_silenced
from batchscan.synth import RadiographSpec, chest_phantom, write_radiograph

SYNTAXES = {
    "unc": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "j2k": JPEG2000Lossless,
    "j2k-lossy": JPEG2000,
    "jpeg": JPEGBaseline8Bit,
    "sv1": JPEGLosslessSV1,
    "htj2k": HTJ2KLossless,
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


def run_scan(archive: Path, out: Path, *extra: str, tree: Path | None = None) -> None:
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
    # `python -m` puts the working folder first on sys.path: run another checkout from it
    env = dict(os.environ, PYTHONPATH=str(tree)) if tree is not None else None
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=tree,
    )
    if result.returncode != 0:
        raise RuntimeError(f"scan failed: {result.stderr}")
    shutil.rmtree(out)


def scan_rate(
    paths: list[Path], sizes: tuple[int, int], root: Path, *extra: str, tree: Path | None = None
) -> tuple[float, float]:
    """Marginal rate and start-up of ``batchscan scan *extra`` (of the checkout `tree`, else
    this one) between archives of the first sizes[0] and sizes[1] files (hardlinked into
    folders under `root`)."""
    (n_small, n_large), label = sizes, "_".join(a.lstrip("-") for a in extra) or "scan"
    label += "-before" if tree is not None else ""
    small = subset(paths, n_small, root / f"{label}-small")
    large = subset(paths, n_large, root / f"{label}-large")
    t_small = timed(partial(run_scan, small, root / "out", *extra, tree=tree))
    t_large = timed(partial(run_scan, large, root / "out", *extra, tree=tree))
    return marginal(n_small, t_small, n_large, t_large)


def simple_input(path: Path) -> np.ndarray:
    """What hand-written code makes of a file: dcmread -> pixel_array -> min-max scaling ->
    Pillow resize to 64 x 64 -> 3 channels."""
    pixels = pydicom.dcmread(path).pixel_array.astype(np.float32)
    pixels = (pixels - pixels.min()) / max(float(pixels.max() - pixels.min()), 1.0)
    small = np.asarray(Image.fromarray(pixels, mode="F").resize((64, 64)), np.float32)
    return np.repeat(small[:, :, None], 3, axis=2)


def naive_loop(paths: list[Path], model: object) -> None:
    """The original blog-style code: one file, one decode, one predict at a time."""
    for path in paths:
        model.predict(simple_input(path)[None], verbose=0)  # type: ignore[attr-defined]


def peer_pipeline(paths: list[Path], model: object, cores: int, batch: int = 256) -> None:
    """A strong hand-written peer: :func:`simple_input` in one process per core (pool start
    included, as in a run), predictions on batches of `batch`."""
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # this process holds TensorFlow
    with ProcessPoolExecutor(cores, mp_context=context) as pool:
        waiting: list[np.ndarray] = []
        for tensor in pool.map(simple_input, paths, chunksize=4):
            waiting.append(tensor)
            if len(waiting) == batch:
                model.predict(np.stack(waiting), verbose=0)  # type: ignore[attr-defined]
                waiting = []
        if waiting:
            model.predict(np.stack(waiting), verbose=0)  # type: ignore[attr-defined]


def per_image_seconds(paths: list[Path], action: Callable[[Path], object]) -> float:
    action(paths[0])  # warm caches and imports
    return min(timed(lambda p=p: action(p)) for p in paths[: min(len(paths), 6)])


def inference_rate(batch: int = 256, count: int = 4096) -> float:
    from batchscan.scoring.infer import Scorer
    from batchscan.scoring.model import load_model

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
        codec_s = per_image_seconds(paths, lambda p: decode_frame(read_dataset(str(p)), None))
        prepare_s = per_image_seconds(paths, partial(model_input, options=StageOptions()))
        full_options = StageOptions(min_edge=None)
        full_s = per_image_seconds(paths, partial(model_input, options=full_options))
        estimates = {  # seconds per file, to size the archives
            "naive": decode_s + 0.04,
            "peer": decode_s / cores,
            "scan": prepare_s / cores,
            "full": full_s / cores,
            "one": prepare_s,
        }
        rates = {}
        loops = {
            "naive": partial(naive_loop, model=model),
            "peer": partial(peer_pipeline, model=model, cores=cores),
        }
        for key, extra in (
            ("naive", None),
            ("peer", None),
            ("scan", ()),
            ("full", ("--full-resolution",)),
            ("one", ("--workers", "1")),
        ):
            n_small, n_large = sizes(args, estimates[key])
            if extra is None:
                t_small = timed(partial(loops[key], paths[:n_small]))
                t_large = timed(partial(loops[key], paths[:n_large]))
                rates[key] = marginal(n_small, t_small, n_large, t_large)
            else:
                rates[key] = scan_rate(paths, (n_small, n_large), root, *extra)
        if args.against is not None:
            counts = sizes(args, estimates["scan"])
            rates["before"] = scan_rate(paths, counts, root, tree=args.against)
    scan, naive, full, one = (rates[k][0] for k in ("scan", "naive", "full", "one"))
    peer = rates["peer"][0]
    decode_limit, prepare_limit, codec_limit = cores / decode_s, cores / prepare_s, cores / codec_s
    return (
        f"{name:<10} {naive:7.1f} {peer:7.1f} {scan:7.1f} {scan / naive:8.1f} "
        f"{scan / peer:7.1f} {full:7.1f} "
        f"{scan / full:7.1f} {one:9.1f} {scan / one:6.2f} {decode_limit:7.1f} "
        f"{scan / decode_limit:6.2f} {codec_limit:7.1f} {scan / codec_limit:7.2f} "
        f"{prepare_limit:8.1f} {rates['scan'][1]:8.1f}"
        + (
            f" {rates['before'][0]:7.1f} {scan / rates['before'][0]:8.2f}"
            if "before" in rates
            else ""
        )
    )


def benchmark(args: argparse.Namespace) -> None:
    from batchscan.scoring.model import load_model

    warnings.simplefilter("ignore")
    cores = default_workers()
    model = load_model().keras_model
    print(
        f"# {args.size} x {args.size} px radiographs; {cores} cores; images/s, marginal "
        f"between {args.small} files and enough more for ~{args.seconds:g} s of work"
    )
    print(f"inference alone (batch 256, XLA): {inference_rate():.0f} images/s")
    print(
        f"{'syntax':<10} {'naive':>7} {'peer':>7} {'scan':>7} {'x naive':>8} {'x peer':>7} "
        f"{'full':>7} "
        f"{'x full':>7} {'1 worker':>9} {'2w/1w':>6} {'decode':>7} {'x dec':>6} "
        f"{'codec':>7} {'x codec':>7} {'prepare':>8} {'start s':>8}"
        + (f" {'before':>7} {'x before':>8}" if args.against else "")
    )
    for name in args.syntaxes.split(","):
        print(measure_syntax(name, args, cores, model), flush=True)


def write_distinct(root: Path, count: int, size: int) -> None:
    """`count` small uncompressed radiographs, each its own SOP instance and study (hardlinks
    would be duplicates of one another, which the scan scores once)."""
    pictures = [chest_phantom(size, seed=i, opacity=0.8 * (i % 2)) for i in range(8)]
    for i in range(count):
        spec = RadiographSpec(bits_stored=12, window=(2048, 4096))
        write_radiograph(root / f"{i // 1000:03d}" / f"{i:06d}", pictures[i % 8], spec)


def scan_process(archive: Path, out: Path) -> subprocess.Popen[str]:
    """``batchscan scan`` as cron runs it, in a child process that reports its peak RSS."""
    code = (
        "import resource, sys; from batchscan.cli import main; "
        f"rc = main(['scan', {str(archive)!r}, '--out', {str(out)!r}, '--no-progress']); "
        "own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
        "print(max(own, kids), file=sys.stderr); sys.exit(rc)"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def timed_scan(archive: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB of the largest process) of one scan."""
    start = time.perf_counter()
    process = scan_process(archive, out)
    _, err = process.communicate()
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(err)
    return seconds, int(err.strip().splitlines()[-1]) / 1024


def memory(args: argparse.Namespace) -> None:
    """Peak RSS of the scan on two archive sizes (each run in a fresh process)."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_distinct(root / "big", args.memory_files, 128)
        quarter = root / "quarter"
        for path in sorted((root / "big").rglob("*"))[: args.memory_files // 4 + 3]:
            if path.is_file():
                link(path, quarter / path.relative_to(root / "big"))
        print(f"{'files':>8} {'seconds':>8} {'peak RSS MiB (largest process)':>32}")
        for archive in (quarter, root / "big"):
            count = sum(1 for p in archive.rglob("*") if p.is_file())
            seconds, peak = timed_scan(archive, root / f"out-{archive.name}")
            print(f"{count:8d} {seconds:8.1f} {peak:32.0f}", flush=True)


def incremental(args: argparse.Namespace) -> None:
    """What a nightly run costs when little changed, and what a crash costs."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        archive, out = root / "archive", root / "out"
        write_distinct(archive, args.incremental_files, args.incremental_size)
        files = sorted(p for p in archive.rglob("*") if p.is_file())
        first, _ = timed_scan(archive, out)
        second, _ = timed_scan(archive, out)
        for path in files[:: max(len(files) // 50, 1)]:  # 2 % of the files touched
            info = path.stat()
            os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
        touched, _ = timed_scan(archive, out)
        crash_out = root / "crash"
        process = scan_process(archive, crash_out)
        time.sleep(first / 2)
        process.kill()
        process.communicate()
        resumed, _ = timed_scan(archive, crash_out)
        print(f"# {len(files)} files of {args.incremental_size} px, uncompressed; seconds")
        print(f"{'run':<44} {'seconds':>8} {'x first':>8}")
        rows = (
            ("first run (everything new)", first),
            ("second run, archive unchanged", second),
            ("third run, 2 % of files touched (mtime)", touched),
            (f"killed at {first / 2:.1f} s, then a resumed run", resumed),
        )
        for label, seconds in rows:
            print(f"{label:<44} {seconds:8.1f} {seconds / first:8.3f}")
        lost = first / 2 + resumed - first
        print(f"cost of the crash: {lost:.1f} s more than an uninterrupted run")


def isolation(args: argparse.Namespace) -> None:
    """Cost of per-file crash isolation: batchscan's WorkerPool against a plain
    ``ProcessPoolExecutor`` running the same per-file stages over the same tasks (what the
    scan used before isolation), same processes, same archive."""
    from concurrent.futures import ProcessPoolExecutor

    from batchscan.engines.pipeline import prepare_batch, prepare_record, worker_context
    from batchscan.engines.workers import WorkerPool
    from batchscan.ingest.discover import iter_files
    from batchscan.ingest.records import ImageRecord, chunks

    context = worker_context()
    cores, options = default_workers(), StageOptions()
    print(f"# {args.size} px, {cores} worker processes, files/s (best of 2)")
    print(f"{'syntax':<10} {'executor':>9} {'isolated':>9} {'ratio':>6}")
    for name in args.syntaxes.split(","):
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            paths = write_archive(root, SYNTAXES[name], 8, args.size)
            prepare_s = per_image_seconds(paths, partial(model_input, options=options))
            count = max(args.large, min(round(args.seconds * cores / prepare_s), args.max_files))
            write_archive(root / "big", SYNTAXES[name], count, args.size)
            big = root / "big" / "all"

            def tasks(big: Path = big) -> list[list[ImageRecord]]:
                return list(chunks(iter_files(big), 16))

            def executor_run(executor: ProcessPoolExecutor) -> None:
                work = tasks()
                list(executor.map(prepare_batch, work, [options] * len(work)))

            rates = {}
            with ProcessPoolExecutor(cores, mp_context=context) as executor:
                executor_run(executor)  # warm: processes started, modules imported
                rates["executor"] = max(
                    count / timed(partial(executor_run, executor)) for _ in "ab"
                )
            with WorkerPool(context, cores, options, prepare_record) as pool:
                list(pool.run(iter(tasks())))
                rates["isolated"] = max(
                    count / timed(lambda pool=pool: list(pool.run(iter(tasks())))) for _ in "ab"
                )
        ratio = rates["isolated"] / rates["executor"]
        print(
            f"{name:<10} {rates['executor']:9.1f} {rates['isolated']:9.1f} {ratio:6.2f}", flush=True
        )


def _stage_loop(paths: list[Path], seconds: float) -> float:
    """Files/s of the per-file stages in this process, over `paths` repeated for `seconds`."""
    options, done, start = StageOptions(), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for path in paths:
            model_input(path, options)
        done += len(paths)
    return done / (time.perf_counter() - start)


def scaling(args: argparse.Namespace) -> None:
    """What the machine itself allows: the per-file stages in 1 process, then in one process
    per core at once, with no batchscan plumbing between them. The scan's 2w/1w cannot beat
    this ratio (memory bandwidth and shared caches, not the pipeline)."""
    from concurrent.futures import ProcessPoolExecutor

    from batchscan.engines.pipeline import WORKER_MALLOC

    os.environ.update(WORKER_MALLOC)
    cores = default_workers()
    context = multiprocessing.get_context("spawn")
    print(f"# {args.size} px; files/s of the per-file stages; {cores} processes at once")
    print(f"{'syntax':<10} {'1 process':>10} {f'{cores} at once':>11} {'ratio':>6}")
    for name in args.syntaxes.split(","):
        with tempfile.TemporaryDirectory() as folder:
            paths = write_archive(Path(folder), SYNTAXES[name], 8, args.size)
            with ProcessPoolExecutor(cores, mp_context=context) as pool:
                list(pool.map(_stage_loop, [paths] * cores, [0.5] * cores))  # warm
                alone = pool.submit(_stage_loop, paths, args.seconds).result()
                together = sum(pool.map(_stage_loop, [paths] * cores, [args.seconds] * cores))
        print(f"{name:<10} {alone:10.1f} {together:11.1f} {together / alone:6.2f}", flush=True)


def engines(args: argparse.Namespace) -> None:
    """``batchscan scan`` with the local engine against ``--engine ray`` (a local Ray
    instance on the same cores), same archive, marginal rates as in the main table."""
    cores = default_workers()
    print(f"# {args.size} px, {cores} cores; images/s, marginal (start-up in seconds)")
    print(f"{'syntax':<10} {'local':>7} {'start':>6} {'ray':>7} {'start':>6} {'ray/local':>9}")
    for name in args.syntaxes.split(","):
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            paths = write_archive(root, SYNTAXES[name], args.small + args.max_files, args.size)
            prepare_s = per_image_seconds(paths, partial(model_input, options=StageOptions()))
            counts = sizes(args, prepare_s / cores)
            rates = {
                engine: scan_rate(paths, counts, root, "--engine", engine)
                for engine in ("local", "ray")
            }
        (local, local_start), (ray, ray_start) = rates["local"], rates["ray"]
        print(
            f"{name:<10} {local:7.1f} {local_start:6.1f} {ray:7.1f} {ray_start:6.1f} "
            f"{ray / local:9.2f}",
            flush=True,
        )


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
    parser.add_argument("--isolation", action="store_true")
    parser.add_argument("--engines", action="store_true")
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--incremental", action="store_true")
    parser.add_argument(
        "--against", type=Path, default=None, help="another checkout to measure in the same run"
    )
    parser.add_argument("--incremental-files", type=int, default=5000)
    parser.add_argument("--incremental-size", type=int, default=256)
    args = parser.parse_args(argv)
    if args.memory:
        memory(args)
    elif args.incremental:
        incremental(args)
    elif args.isolation:
        isolation(args)
    elif args.engines:
        engines(args)
    elif args.scaling:
        scaling(args)
    else:
        with native_stderr_silenced():  # TensorFlow's C++ start-up and XLA lines
            benchmark(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
