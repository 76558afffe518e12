"""The model input of every test file is pinned to the declared input version.

The input store (:mod:`batchscan.scoring.input_store`) keeps inputs under
:data:`batchscan.ingest.preprocess.INPUT_VERSION`: a release that changes an input (a decoder, the
windowing, the preprocessing) without raising it would score stored inputs that a fresh
read no longer gives. So this test recomputes the inputs of the demo archive's files and of
pydicom's and pydicom-data's real files, at reduced and at full resolution, and compares
their digests (of the inputs at the store's 16-bit precision) with
``tests/data/input_digests.json``.

An input whose digest differs is forgiven only when it lies within floating-point noise of
the recorded one: the means of its 4 x 4 blocks (``tests/data/input_blocks.npz``) within
:data:`BLOCK_TOLERANCE`. A least-squares estimate (the JPEG 2000 bands of
:mod:`batchscan.sampling`) computed by another CPU's BLAS kernels can move a pixel by one
16-bit level (1.5e-5), which changes a digest and no score; a changed decoder, window or
preprocessing moves block means by 1e-4 and more.

When it fails after a deliberate change: raise ``INPUT_VERSION``, then write the digests
afresh with ``python tests/test_input_digests.py``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from batchscan.engines.pipeline import model_input
from batchscan.ingest.header import StageOptions
from batchscan.ingest.preprocess import INPUT_VERSION
from batchscan.scoring.input_store import decode, encode
from batchscan.synth import write_demo_archive

DIGESTS = Path(__file__).parent / "data" / "input_digests.json"
BLOCKS = Path(__file__).parent / "data" / "input_blocks.npz"
#: How far a 4 x 4 block mean of an input may lie from the recorded one (see above).
BLOCK_TOLERANCE = 1e-5
#: Real files of pydicom (test_files) and pydicom-data that give a model input under
#: ``--all-modalities``: radiographs, MR, CT, RT dose, in many transfer syntaxes.
REAL_FILES = (
    "693_J2KR.dcm",
    "693_UNCI.dcm",
    "693_UNCR.dcm",
    "JPEG-LL.dcm",
    "JPEG2000_UNC.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "MR2_J2KI.dcm",
    "MR2_J2KR.dcm",
    "RG1_J2KI.dcm",
    "RG1_J2KR.dcm",
    "RG1_UNCR.dcm",
    "RG3_J2KI.dcm",
    "RG3_J2KR.dcm",
    "RG3_UNCR.dcm",
    "mlut_18.dcm",
    "vlut_04.dcm",
    "693_J2KI.dcm",
    "CT_small.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "JPEG-lossy.dcm",
    "JPEG2000.dcm",
    "JPEGLSNearLossless_16.dcm",
    "JPGExtended.dcm",
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_padded.dcm",
    "image_dfl.dcm",
    "rtdose_rle_1frame.dcm",
)
RESOLUTIONS = {"reduced": {}, "full": {"min_edge": None}}


def _stored(path: Path, options: StageOptions) -> np.ndarray:
    """The input as the store keeps it (16-bit levels), one channel."""
    return decode(encode(model_input(path, options)))[..., 0]


def _digest(stored: np.ndarray) -> str:
    return hashlib.sha256(stored.tobytes()).hexdigest()[:20]


def _blocks(stored: np.ndarray) -> np.ndarray:
    return stored.reshape(16, 4, 16, 4).mean(axis=(1, 3))


def current_inputs() -> dict[str, np.ndarray | str]:
    """Each test file's stored input, by ``resolution/file`` (the reason where none)."""
    inputs: dict[str, np.ndarray | str] = {}
    with tempfile.TemporaryDirectory() as folder:
        demo = Path(folder)
        write_demo_archive(demo, size=512, studies=4)
        files: dict[str, Path] = {
            f"demo/{p.relative_to(demo)}": p for p in sorted(demo.rglob("IM*")) if p.is_file()
        }
        for name in REAL_FILES:
            found = get_testdata_file(name)
            if found is not None:
                files[name] = Path(found)
        for resolution, extra in RESOLUTIONS.items():
            options = StageOptions(all_modalities=True, **extra)  # type: ignore[arg-type]
            for name, path in files.items():
                try:
                    inputs[f"{resolution}/{name}"] = _stored(path, options)
                except ValueError as exc:  # a file that gives no input: its reason is pinned
                    inputs[f"{resolution}/{name}"] = f"no input: {str(exc).split(': ', 1)[1]}"
    return inputs


def current_digests(inputs: dict[str, np.ndarray | str]) -> dict[str, str]:
    """Digest of each input (the pinned reason of a file that gives none)."""
    return {k: v if isinstance(v, str) else _digest(v) for k, v in inputs.items()}


def test_inputs_change_only_with_the_input_version() -> None:
    recorded = json.loads(DIGESTS.read_text())
    assert recorded["input_version"] == INPUT_VERSION, (
        f"INPUT_VERSION is {INPUT_VERSION} but the digests were written for "
        f"{recorded['input_version']}: write them afresh (python tests/test_input_digests.py)"
    )
    inputs = current_inputs()
    digests = current_digests(inputs)
    if len(digests) < len(recorded["digests"]):
        pytest.skip("pydicom-data is not installed")
    with np.load(BLOCKS) as data:
        blocks = {k: data[k] for k in data.files}

    def within_noise(key: str) -> bool:
        now = inputs.get(key)
        return (
            isinstance(now, np.ndarray)
            and key in blocks
            and bool(np.abs(_blocks(now) - blocks[key]).max() <= BLOCK_TOLERANCE)
        )

    changed = sorted(
        k for k, v in recorded["digests"].items() if digests.get(k) != v and not within_noise(k)
    )
    assert not changed, (
        f"the model inputs of {len(changed)} test files changed ({', '.join(changed[:5])}) "
        f"while INPUT_VERSION stayed {INPUT_VERSION}: stored inputs would no longer equal a "
        "fresh read. Raise INPUT_VERSION, then write the digests afresh."
    )


if __name__ == "__main__":
    made = current_inputs()
    DIGESTS.write_text(
        json.dumps({"input_version": INPUT_VERSION, "digests": current_digests(made)}, indent=1)
        + "\n"
    )
    np.savez_compressed(
        BLOCKS, **{k: _blocks(v) for k, v in made.items() if isinstance(v, np.ndarray)}
    )
    print(f"wrote {DIGESTS} and {BLOCKS}", file=sys.stderr)
