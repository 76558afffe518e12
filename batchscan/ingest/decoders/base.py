"""What every decoder module returns, and the small helpers they share."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from pydicom.dataset import Dataset

from batchscan.ingest.sampling import Sampling


class Decoded(NamedTuple):
    """One decoded frame.

    Attributes
    ----------
    values:
        Stored values (the dtype pydicom would give) at 1 / 2**level of the full size.
    level:
        How many times the codec halved the picture (0 = full resolution).
    sampling:
        What the values are made of: the full-resolution shape and the codec's reduction
        (see :mod:`batchscan.ingest.sampling`).
    decoder:
        Which decoder made it (the ``decoder`` column of ``images.parquet``).
    """

    values: np.ndarray
    level: int
    sampling: Sampling
    decoder: str


def full_resolution(values: np.ndarray, decoder: str) -> Decoded:
    """A frame decoded at full resolution (no reduction)."""
    shape = (int(values.shape[0]), int(values.shape[1])) if values.ndim >= 2 else (values.size, 1)
    return Decoded(values, 0, Sampling(shape), decoder)


def syntax_of(ds: Dataset) -> str:
    """The Transfer Syntax UID of the file meta, '' when there is none."""
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def reduction_level(rows: int, columns: int, min_edge: int) -> int:
    """Largest r such that the short edge, halved r times (rounding up), stays >= min_edge."""
    level = 0
    short = min(rows, columns)
    while -(-short // (2 ** (level + 1))) >= min_edge:
        level += 1
    return level
