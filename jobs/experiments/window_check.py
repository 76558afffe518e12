"""The fallback (percentile) window against DCMTK's histogram window, file by file.

    apt-get install dcmtk            # dcm2pnm; not a dependency of batchscan
    python jobs/experiments/window_check.py [--out DIR]

For every file without a usable VOI (no window, no VOI LUT) that is a single-frame grayscale
image, among pydicom's and pydicom-data's test files plus a padded, signed CT slice made here
(Pixel Padding Value -2000, Rescale Intercept -1024, a circular field of view, as the NEMA
WG04 CT1 image is stored), it compares batchscan's display picture (full resolution,
``dicom.display_image_of``) with ``dcm2pnm +Wh 1`` (DCMTK's histogram window ignoring 1 %,
i.e. its 0.5th and 99.5th percentiles) and prints the mean absolute difference over
non-padding pixels, the correlation, and both medians. The same comparison on the 28 x 28
picture (the preprocessing's first step) is the last columns.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_files
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from batchscan.ingest.dicom import display_image_of
from batchscan.ingest.preprocess import SOURCE_SIZE
from batchscan.ingest.sampling import resize


def padded_ct(path: Path, n: int = 512, seed: int = 0) -> Path:
    """A windowless, signed CT slice with padding outside a circular field of view."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:n, :n] / (n - 1) * 2 - 1
    hu = np.full((n, n), -1000.0)
    body = (x / 0.80) ** 2 + (y / 0.62) ** 2 < 1
    hu[body] = 40
    hu[body & ((x / 0.78) ** 2 + (y / 0.60) ** 2 > 0.85)] = -100
    for cx in (-0.38, 0.38):
        hu[((x - cx) / 0.28) ** 2 + (y / 0.42) ** 2 < 1] = -850
    hu[(x / 0.06) ** 2 + ((y + 0.45) / 0.06) ** 2 < 1] = 900
    stored = np.rint(hu + rng.normal(0, 12, hu.shape) + 1024).astype(np.int16)
    stored[x**2 + y**2 > 0.98] = -2000
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CT", n, n, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.PixelPaddingValue = 1, -1024, -2000
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def windowless_test_files() -> list[Path]:
    """pydicom's and pydicom-data's single-frame grayscale files without a usable VOI."""
    found = []
    for name in sorted(set(get_testdata_files("*"))):
        try:  # broken test files are other tests' business
            ds = pydicom.dcmread(name, stop_before_pixels=True)
            usable = (
                bool(ds.get("Rows") and ds.get("Columns"))
                and ds.get("SamplesPerPixel", 1) == 1
                and int(ds.get("NumberOfFrames", 1) or 1) == 1
                and "WindowCenter" not in ds
                and "VOILUTSequence" not in ds
                and str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME")
            )
        except Exception:
            continue
        if usable:
            found.append(Path(name))
    return found


def compare(path: Path, work: Path) -> tuple[float, float, float, float, float] | None:
    """(mean |diff|, correlation, median ours, median DCMTK, mean |diff| at 28 px)."""
    ds = pydicom.dcmread(path)
    try:
        ours = display_image_of(ds).pixels
    except Exception:
        return None
    pgm = work / f"{path.stem}.pgm"
    done = subprocess.run(["dcmj2pnm", "+Wh", "1", "+on", str(path), str(pgm)], capture_output=True)
    if done.returncode != 0 or not pgm.exists():
        return None
    theirs = np.asarray(Image.open(pgm), dtype=np.float64) / 255.0
    if theirs.shape != ours.shape:
        return None
    pad = ds.get("PixelPaddingValue")
    keep = np.ones(ours.shape, bool) if pad is None else ds.pixel_array != pad
    diff = np.abs(ours - theirs)[keep]
    corr = float(np.corrcoef(ours[keep], theirs[keep])[0, 1]) if diff.size > 1 else 1.0
    side = (SOURCE_SIZE, SOURCE_SIZE)
    small = np.abs(resize(ours.astype(np.float32), side) - resize(theirs.astype(np.float32), side))
    return (
        float(diff.mean()),
        corr,
        float(np.median(ours[keep])),
        float(np.median(theirs[keep])),
        float(small.mean()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the DCMTK pictures here")
    args = parser.parse_args()
    if shutil.which("dcmj2pnm") is None:
        raise SystemExit("dcmj2pnm not found: apt-get install dcmtk")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = [padded_ct(work / "padded_ct.dcm"), *windowless_test_files()]
        head = ("mean|d|", "corr", "median", "DCMTK", "28px|d|")
        print(f"{'file':32s} " + " ".join(f"{h:>8s}" for h in head))
        for path in files:
            result = compare(path, work)
            if result is None:
                continue
            print(f"{path.name[:32]:32s} " + " ".join(f"{v:8.4f}" for v in result))


if __name__ == "__main__":
    main()
