"""GPU figures: model inference at large batches (float32 and mixed precision), and
nvImageCodec's batch decode of 2048 px JPEG 2000 / JPEG lossless frames.

Runs wherever Keras 3 runs: with TensorFlow (the scan job's backend) or, on a GPU machine
that has JAX but no TensorFlow, with ``KERAS_BACKEND=jax``; the model file and the
preprocessing are the scan job's own. Prints two tables.

    python jobs/experiments/gpu_measure.py --frames DIR          # DIR from --write-frames
    python jobs/experiments/gpu_measure.py --write-frames DIR    # needs batchscan's codecs (here)

Inference input is host memory (numpy), as the scan job hands it over; each figure is the
best of 3 timed repetitions after a warm-up call that compiles the shape.
"""

from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "batchscan" / "models" / "pneumonia_cnn_seed.keras"
BATCHES = (256, 1024, 2048, 4096, 8192)


def write_frames(folder: Path, count: int, size: int) -> None:
    """Encode `count` 2048 px 12-bit chest phantoms as JPEG 2000 lossless and JPEG lossless
    SV1 codestreams (what a DICOM file's encapsulated frame holds)."""
    import imagecodecs

    from batchscan.synth import RadiographSpec, chest_phantom, stored_values

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = stored_values(chest_phantom(size, seed=i), RadiographSpec(bits_stored=12))
        (folder / f"{i:02d}.j2k").write_bytes(
            imagecodecs.jpeg2k_encode(pixels, level=0, codecformat="J2K", reversible=True)
        )
        (folder / f"{i:02d}.ljpg").write_bytes(
            imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1, bitspersample=12)
        )


def best_of(fn, repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def inference_table(batches: tuple[int, ...] = BATCHES) -> None:
    """images/s of the shipped model per batch size, float32 vs mixed precision."""
    import keras

    base = keras.models.load_model(MODEL, compile=False)
    rng = np.random.default_rng(0)
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}")
    policies = ["float32", "mixed_bfloat16", "mixed_float16"]
    models = {}
    for policy in policies:
        config = base.get_config()
        for layer in config["layers"]:
            if layer["class_name"] != "InputLayer":  # inputs stay float32
                layer["config"]["dtype"] = policy
        model = keras.Sequential.from_config(config)
        model.set_weights(base.get_weights())
        models[policy] = model
    probe = rng.random((512, 64, 64, 3), dtype=np.float32)
    reference = np.asarray(models["float32"].predict_on_batch(probe), dtype=np.float64)
    print("| batch | " + " | ".join(f"{p} img/s" for p in policies) + " |")
    print("|---:|" + "---:|" * len(policies))
    for batch in batches:
        x = rng.random((batch, 64, 64, 3), dtype=np.float32)
        rates = []
        for policy in policies:
            model = models[policy]
            model.predict_on_batch(x)  # compile this shape
            seconds = best_of(lambda m=model, x=x: np.asarray(m.predict_on_batch(x)))
            rates.append(batch / seconds)
        print(f"| {batch} | " + " | ".join(f"{r:,.0f}" for r in rates) + " |")
    for policy in policies[1:]:
        out = np.asarray(models[policy].predict_on_batch(probe), dtype=np.float64)
        print(f"{policy}: max |score - float32 score| = {np.abs(out - reference).max():.4f}")


def decode_table(folder: Path) -> None:
    """nvImageCodec batch decode (GPU) of the frames in `folder`; both codings are lossless
    codings of the same pixels, so the two decodes of a frame must be equal."""
    from nvidia import nvimgcodec

    decoder = nvimgcodec.Decoder()
    first_pixels: dict[str, np.ndarray] = {}
    for kind, pattern in (("JPEG 2000 lossless", "*.j2k"), ("JPEG lossless SV1", "*.ljpg")):
        files = sorted(glob.glob(str(folder / pattern)))
        streams = [Path(f).read_bytes() for f in files]
        params = nvimgcodec.DecodeParams(
            color_spec=nvimgcodec.ColorSpec.UNCHANGED, allow_any_depth=True
        )
        try:
            first = decoder.decode(streams[:1], params=params)
            sample = np.asarray(first[0].cpu()).squeeze()
            first_pixels[kind] = sample.astype(np.int64)
        except Exception as exc:  # a codec nvImageCodec cannot run here
            print(f"{kind}: nvImageCodec failed: {type(exc).__name__}: {exc}")
            continue
        for batch in (len(streams), 8 * len(streams)):
            data = (streams * (batch // len(streams)))[:batch]

            def run(data: list[bytes] = data, params: object = params) -> None:
                images = decoder.decode(data, params=params)
                for image in images:
                    if image is None:
                        raise RuntimeError("a frame did not decode")
                np.asarray(images[-1].cpu())  # wait for the batch to finish

            run()
            seconds = best_of(run)
            print(
                f"{kind}: batch {batch}: {batch / seconds:,.1f} frames/s "
                f"(dtype {sample.dtype}, shape {sample.shape})"
            )
    if len(first_pixels) == 2:
        a, b = first_pixels.values()
        print(f"the two lossless decodes of frame 0 are equal: {np.array_equal(a, b)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=Path, help="folder of frames for the decode table")
    parser.add_argument("--write-frames", type=Path, help="write frames here and stop")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument(
        "--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes"
    )
    args = parser.parse_args()
    if args.write_frames:
        write_frames(args.write_frames, args.count, args.size)
        return
    if not args.skip_inference:
        inference_table(tuple(int(b) for b in args.batches.split(",")))
    if args.frames:
        decode_table(args.frames)


if __name__ == "__main__":
    main()
