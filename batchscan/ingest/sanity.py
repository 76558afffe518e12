"""Image sanity gate: pictures with no anatomy are not scored, whatever the model.

Between preprocessing and inference. A blank detector readout carries no anatomy, so any score
the model gives it is noise (an all-zero 15,000 px CR scored 1.0 and was flagged). "Blank" is
defined here, once, for the shipped model and every trained one alike, as what it means: a
picture that is **constant**, or **detector noise only**. Both are judged on the model input
(what :func:`batchscan.ingest.preprocess.preprocess` makes of the image), on two numbers:

* the spread: the standard deviation of the input;
* the structure: the spread of its 8 x 8 block means (each block 8 x 8 input pixels, about 3.5
  pixels of the 28 px picture) divided by the spread. Anatomy is large: lungs, mediastinum,
  diaphragm survive block averaging (ratio near 1). Noise is not: uncorrelated noise averages
  out (ratio near 0.45 at every image size, as measured below).

A picture is ``skipped: blank_image`` when its spread is below :data:`MAX_CONSTANT_SPREAD` or
its structure below :data:`MIN_STRUCTURE`. The bounds rest on a measurement
(``python jobs/experiments/blank_bound.py``, all 19,625 pictures of ../shared/data through the same
preprocessing): the smallest spread of any real film is 0.0229 and the smallest structure
0.630; all-zero and constant pictures have spread 0, and noise-only pictures (uniform, Gaussian,
Poisson detector noise stretched by a percentile window; 28 to 1024 px) have structure at most
0.523. Each bound lies between the two with room on both sides.

Earlier releases took the bound from each model's card: the smallest spread among its
training pictures. A sample minimum is not a definition of blank: it excludes, by
construction, about one new film in N of the same kind (a fine-tuned model's bound of 0.1516
skipped 2 of 503 real films of its own hospital).
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from batchscan.ingest.records import ImageRecord

#: Name and version of the rule, kept in the state's settings key and in model cards.
BLANK_RULE: Final = "batchscan-blank-v1"
#: Below this spread (standard deviation of the model input, range [0, 1]) a picture is
#: constant: 1 % of the display range, about 2.5 grey levels of 256.
MAX_CONSTANT_SPREAD: Final = 0.01
#: Below this structure (block-mean spread / spread) a picture is noise only.
MIN_STRUCTURE: Final = 0.58
#: Side of the blocks whose means measure structure, in model-input pixels.
BLOCK: Final = 8


def input_spread(tensor: np.ndarray) -> float:
    """The spread of one model input: the standard deviation of its grayscale channel."""
    return float(tensor[..., 0].std())


def input_structure(tensor: np.ndarray) -> float:
    """The spread of the model input's :data:`BLOCK` x :data:`BLOCK` block means over its
    spread (0 for a constant picture)."""
    grey = np.asarray(tensor[..., 0], dtype=np.float64)
    rows, cols = (side // BLOCK * BLOCK for side in grey.shape)
    blocks = grey[:rows, :cols].reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
    spread = grey.std()
    return float(blocks.mean(axis=(1, 3)).std() / spread) if spread > 0 else 0.0


def blank_detail(tensor: np.ndarray) -> str | None:
    """Why a model input is blank (constant or noise only), or None when it is not."""
    spread = input_spread(tensor)
    if spread < MAX_CONSTANT_SPREAD:
        return f"constant: model input std {spread:.4f} < {MAX_CONSTANT_SPREAD}"
    structure = input_structure(tensor)
    if structure < MIN_STRUCTURE:
        return (
            f"noise only: block-mean spread / spread {structure:.3f} < {MIN_STRUCTURE} "
            f"(std {spread:.4f})"
        )
    return None


def passes(record: ImageRecord, tensor: np.ndarray) -> bool:
    """False (and the record ``skipped: blank_image``) for a blank picture; True otherwise."""
    detail = blank_detail(tensor)
    if detail is None:
        return True
    record.skip("blank_image", detail)
    return False


def describe(inputs: np.ndarray, computed_on: str) -> dict[str, Any]:
    """The card's ``sanity`` entry: the rule (the same for every model) and, for the record,
    how far the model's own training pictures lie from its bounds."""
    spreads = np.array([input_spread(x) for x in inputs])
    structures = np.array([input_structure(x) for x in inputs])
    return {
        "rule": BLANK_RULE,
        "blank_if": f"model input std < {MAX_CONSTANT_SPREAD} (constant) or block-mean "
        f"spread / spread < {MIN_STRUCTURE} with {BLOCK} x {BLOCK} blocks (noise only)",
        "max_constant_spread": MAX_CONSTANT_SPREAD,
        "min_structure": MIN_STRUCTURE,
        "training_min_spread": float(spreads.min()) if spreads.size else None,
        "training_min_structure": float(structures.min()) if structures.size else None,
        "computed_on": computed_on,
    }
