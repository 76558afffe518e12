"""Image sanity gate: pictures the model must not score, judged on what the model would see.

Between preprocessing and inference: a blank detector readout or a near-constant picture
(an all-zero 15,000 px CR scored 1.0 and was flagged) carries no anatomy, so any score the
model gives it is noise. The bound is not guessed: it is the smallest spread (standard
deviation of the model input) of any image of the model's training split, stored in the
model card as ``sanity.min_input_std`` (:func:`batchscan.training.sanity_bound`); a picture
flatter than every training picture is ``skipped: blank_image``.
"""

from __future__ import annotations

import numpy as np

from batchscan.records import ImageRecord


def input_spread(tensor: np.ndarray) -> float:
    """The spread of one model input: the standard deviation of its grayscale channel."""
    return float(tensor[..., 0].std())


def passes(record: ImageRecord, tensor: np.ndarray, min_input_std: float | None) -> bool:
    """False (and the record ``skipped: blank_image``) for a picture flatter than the
    flattest training image; True otherwise, and always when there is no bound."""
    if min_input_std is None:
        return True
    spread = input_spread(tensor)
    if spread >= min_input_std:
        return True
    record.skip(
        "blank_image",
        f"model input std {spread:.4f}, below the flattest training image's {min_input_std:.4f}",
    )
    return False
