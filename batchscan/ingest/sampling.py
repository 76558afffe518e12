"""What the samples of a reduced decode stand for, and full-resolution views estimated from them.

A reduced decode does not hand over the radiograph's pixels but samples made from them: a box
average of f x f pixels (DCT scaling, :func:`batchscan.ingest.decoders.box_reduce`) or a JPEG 2000
wavelet low-pass band, whose sample k sits on full-resolution pixel k * 2**level (not in the
middle of its block), is filtered by the 5/3 or 9/7 low-pass (sharper than a box, with
sidelobes) and mirrored at the image border. Both are linear maps, along each axis, from the
full-resolution values: :class:`Sampling` records them (the full-resolution shape and the steps
in order) so that later stages need not guess.

For a box average the preprocessing's antialiased resize works on the samples as on pixels.
For a wavelet band it does not: resized like pixels (even moved onto the box grid and filtered
to a box's frequency response, as this project did before), a 256 px band of a 2048 px image
(three levels) moved test-split scores by up to 0.0059 against the full decode, mostly through
the first and last rows and columns of the 28 px picture, where the band's mirrored filter and
the resize's clipped kernel disagree. So a band is read through :func:`reconstruction`: the
linear least-squares (Gaussian posterior-mean) estimate of the full-resolution values given
the samples, under a generic stationary image model. Any linear view of the full image is then
estimated from the band by applying the view to that estimate, one small matrix per axis,
cached per image size; :func:`resize` is the one view needed (the preprocessing's resize to
28 px and the fallback window's sample).

The image model is the classic one of image coding (A. K. Jain, *Fundamentals of Digital Image
Processing*, 1989, ch. 2 and 5): an exponential covariance exp(-d / L) with L a tenth of the
image side (:data:`CORRELATION`), plus white noise at 1e-3 of the variance (:data:`NOISE`). It
is not fitted to any data set, and the scores hardly depend on it: on 150 val images written
as 2048 px JPEG 2000 (three levels), the largest score change against the full decode stayed
0.0011 (header window) / 0.0016 (percentile window) with L five times larger or the noise ten
times larger or smaller; L four times smaller gave 0.0011 / 0.0036.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final

import numpy as np
from PIL import Image

#: JPEG 2000's two wavelets, as the COD marker names them (ISO 15444-1 Table A.20).
IRREVERSIBLE_9_7: Final = 0
REVERSIBLE_5_3: Final = 1
#: Their analysis low-pass filters (ISO 15444-1 Annex F), scaled to DC gain 1 as the decoded
#: band is.
LOW_PASS: Final[dict[int, np.ndarray]] = {
    REVERSIBLE_5_3: np.array([-1.0, 2.0, 6.0, 2.0, -1.0]) / 8.0,
    IRREVERSIBLE_9_7: np.array(
        [
            0.026748757411,
            -0.016864118443,
            -0.078223266529,
            0.266864118443,
            0.602949018236,
            0.266864118443,
            -0.078223266529,
            -0.016864118443,
            0.026748757411,
        ]
    ),
}
#: Correlation length of the image model, as a fraction of the image side.
CORRELATION: Final = 0.1
#: White-noise variance of the image model, relative to the signal's.
NOISE: Final = 1e-3
#: Largest (samples x pixels) matrix :func:`reconstruction` builds for one axis (64 MB of
#: float64; a 4280 px axis at three levels needs 2.3 M elements). Decoders do not hand over a
#: band beyond it (a hostile or stitched 60,000 px image), they decode in full instead.
MAX_ELEMENTS: Final = 1 << 23
#: Elements of the identity handled at once while a step's matrix is built (bounds memory:
#: 32 MB of float64 whatever the image size).
_BLOCK: Final = 1 << 22


@dataclass(frozen=True, slots=True)
class Box:
    """Mean of `factor` consecutive samples; trailing samples that fill no block are dropped
    (as :func:`batchscan.ingest.decoders.box_reduce` does)."""

    factor: int

    def size(self, n: int) -> int:
        """Samples this step makes of `n`."""
        return n // self.factor

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The step along axis 0 of a float array."""
        rows = self.size(x.shape[0]) * self.factor
        return x[:rows].reshape(rows // self.factor, self.factor, *x.shape[1:]).mean(axis=1)


@dataclass(frozen=True, slots=True)
class WaveletBand:
    """The low-pass band after `level` JPEG 2000 decompositions with `transform`
    (:data:`REVERSIBLE_5_3` or :data:`IRREVERSIBLE_9_7`), image origin at 0."""

    transform: int
    level: int

    def size(self, n: int) -> int:
        """Samples this step makes of `n` (rounded up, as JPEG 2000 does)."""
        return -(-n // (1 << self.level))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The step along axis 0 of a float array: `level` times, filter with whole-sample
        symmetric extension (ISO 15444-1 F.3.7) and keep the even samples."""
        taps = LOW_PASS[self.transform]
        half = len(taps) // 2
        for _ in range(self.level):
            n = x.shape[0]
            if n == 1:
                continue
            period = 2 * (n - 1)
            index = np.abs(np.arange(-half, n + half)) % period
            extended = x[np.where(index >= n, period - index, index)]
            out = np.zeros(((n + 1) // 2, *x.shape[1:]))
            for t, c in enumerate(taps):
                out += c * extended[t : t + n : 2]
            x = out
        return x


Step = Box | WaveletBand


@dataclass(frozen=True, slots=True)
class Sampling:
    """How a decoded picture was made from the full-resolution image.

    Attributes
    ----------
    shape:
        Rows and columns of the full-resolution image.
    steps:
        The reductions applied to both axes, in order; empty for a full decode.
    """

    shape: tuple[int, int]
    steps: tuple[Step, ...] = ()

    def then(self, step: Step) -> Sampling:
        """This sampling followed by `step`."""
        return Sampling(self.shape, (*self.steps, step))

    @property
    def banded(self) -> bool:
        """Whether a wavelet band is among the steps (samples are then not pixel-like)."""
        return any(isinstance(step, WaveletBand) for step in self.steps)

    def estimable(self) -> bool:
        """Whether :func:`reconstruction` stays within :data:`MAX_ELEMENTS` on both axes."""
        return all(n * sampled_size(n, self.steps) <= MAX_ELEMENTS for n in self.shape)

    def sampled_shape(self) -> tuple[int, int]:
        """The shape the steps make of :attr:`shape`."""
        return sampled_size(self.shape[0], self.steps), sampled_size(self.shape[1], self.steps)


def sampled_size(n: int, steps: tuple[Step, ...]) -> int:
    """Samples `steps` make of `n` values."""
    for step in steps:
        n = step.size(n)
    return n


def apply_steps(steps: tuple[Step, ...], x: np.ndarray) -> np.ndarray:
    """`steps` along axis 0 of `x` (float64)."""
    x = np.asarray(x, dtype=np.float64)
    for step in steps:
        x = step.apply(x)
    return x


def axis_matrix(n: int, steps: tuple[Step, ...]) -> np.ndarray:
    """The (samples x n) matrix of `steps` along one axis of `n` values."""
    blocks = []
    width = max(1, _BLOCK // n)
    for start in range(0, n, width):
        identity = np.zeros((n, min(width, n - start)))
        identity[np.arange(start, start + identity.shape[1]), np.arange(identity.shape[1])] = 1
        blocks.append(apply_steps(steps, identity))
    return np.concatenate(blocks, axis=1)


@functools.lru_cache(maxsize=4)
def reconstruction(n: int, steps: tuple[Step, ...]) -> np.ndarray:
    """The (n x samples) matrix G whose product with the samples along one axis is the
    least-squares estimate of the `n` full-resolution values (see the module doc).

    G = S A^T (A S A^T)^-1 for the steps' matrix A and the model covariance S; S A^T is an
    exponential smoothing of A's rows, done by FFT so that S (n x n) is never built. About
    0.2 s for n = 2048 and three levels, 0.6 s for a 4280 px axis, once per image size and
    process: cached for the last few sizes (read-only float32).
    """
    a = axis_matrix(n, steps)
    length = CORRELATION * n
    kernel = np.exp(-np.arange(n) / length)
    circular = np.concatenate([kernel, [0.0], kernel[:0:-1]])  # length 2n, even
    spectrum = np.fft.rfft(circular)
    smoothed = np.fft.irfft(np.fft.rfft(a.T, 2 * n, axis=0) * spectrum[:, None], 2 * n, axis=0)
    s_at = smoothed[:n] + NOISE * a.T  # S A^T, (n x samples)
    g = np.linalg.solve(a @ s_at, s_at.T).T  # A S A^T is symmetric
    out = g.astype(np.float32)
    out.flags.writeable = False
    return out


def _pillow_resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pillow BICUBIC (antialiased when reducing) of a 2-D float array to (rows, columns)."""
    picture = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    if picture.size != (size[1], size[0]):
        picture = picture.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(picture, dtype=np.float32)


@functools.lru_cache(maxsize=32)
def resize_view(n: int, steps: tuple[Step, ...], top: int, side: int, size: int) -> np.ndarray:
    """(size x samples): the full-resolution pixels [top, top + side) of one axis resized to
    `size` as :func:`resize` does, estimated from samples made by `steps`.

    Pillow itself resizes the rows of the full-resolution estimate
    (:func:`reconstruction`), so the view is exactly that resize applied to the estimate.
    """
    basis = reconstruction(n, steps)[top : top + side].T  # (samples x side)
    return np.ascontiguousarray(_pillow_resize(basis, (basis.shape[0], size)).T)


def centre_square(image: np.ndarray) -> np.ndarray:
    """Return the centred square view of `image` whose side is the short edge (no copy)."""
    rows, cols = image.shape
    side = min(rows, cols)
    top = (rows - side) // 2
    left = (cols - side) // 2
    return image[top : top + side, left : left + side]


def resize(
    values: np.ndarray,
    size: tuple[int, int],
    sampling: Sampling | None = None,
    *,
    square: bool = False,
) -> np.ndarray:
    """The full-resolution picture (its centre square when `square`) resized to `size`
    (rows, columns) with Pillow BICUBIC, antialiased when reducing; float32.

    `values` are samples made by `sampling` (None: the pixels themselves). Pixel-like
    samples (box averages) are resized as they are; from a wavelet band the resize is
    estimated (:func:`resize_view`).

    Raises
    ------
    ValueError
        If a band's `values` are not the shape its sampling makes.
    """
    if sampling is None or not sampling.banded:
        return _pillow_resize(centre_square(values) if square else values, size)
    views = []
    for n, out in zip(sampling.shape, size, strict=True):
        side = min(sampling.shape) if square else n
        views.append(resize_view(n, sampling.steps, (n - side) // 2, side, out))
    return estimate(values, views[0], views[1])


def estimate(values: np.ndarray, rows_view: np.ndarray, columns_view: np.ndarray) -> np.ndarray:
    """`rows_view @ values @ columns_view.T` in float32: a separable view of the samples.

    Raises
    ------
    ValueError
        If the views do not fit `values` (the decoder made another shape than declared).
    """
    if values.shape != (rows_view.shape[1], columns_view.shape[1]):
        raise ValueError(
            f"decoded shape {values.shape} does not match its sampling "
            f"({rows_view.shape[1]}, {columns_view.shape[1]})"
        )
    return rows_view @ np.asarray(values, dtype=np.float32) @ columns_view.T
