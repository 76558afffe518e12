"""Charts as inline SVG for the self-contained HTML pages (``evaluation.html``).

The pages are opened from a file share on a hospital workstation with no network, so each
chart is an SVG string put straight into the page: no script, no CDN, no image file beside it.
matplotlib draws them (Agg, no display needed); text stays text (``svg.fonttype = none``),
which keeps the files small and the numbers searchable.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

import numpy as np

#: Figure size in inches (at 96 dpi in a browser: about 480 x 340 px).
SIZE: Final = (5.0, 3.5)
#: Colours for normal (0) and pneumonia (1), told apart also by line style for grey printouts.
COLOURS: Final = {0: "#1f77b4", 1: "#d62728"}


@contextmanager
def _figure() -> Iterator[tuple[Any, Any]]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 9, "svg.hashsalt": "bs"}):
        fig, ax = plt.subplots(figsize=SIZE)
        try:
            yield fig, ax
        finally:
            plt.close(fig)


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.tight_layout()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    text = text[text.index("<svg") :]  # drop the XML prologue and doctype: inline in HTML
    if "<metadata>" in text:  # matplotlib's RDF block names outside vocabularies by URL
        text = text[: text.index("<metadata>")] + text[text.index("</metadata>") + 11 :]
    return text


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold (positive: score >= t)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / max(y.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~y).sum(), 1)]
    return fpr, tpr


def roc_svg(
    labels: np.ndarray,
    scores: np.ndarray,
    points: Mapping[str, tuple[float, float]],
    title: str,
) -> str:
    """ROC curve with named operating points ``{name: (1 - specificity, sensitivity)}``."""
    fpr, tpr = roc_curve(labels, scores)
    with _figure() as (fig, ax):
        ax.plot(fpr, tpr, color="black", lw=1.5, label="ROC")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance")
        for (name, (x, y)), marker in zip(points.items(), "os^", strict=False):
            ax.plot([x], [y], marker=marker, ls="none", ms=7, label=name)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=8)
        return _svg(fig)


def calibration_svg(labels: np.ndarray, scores: np.ndarray, bins: int, title: str) -> str:
    """Reliability diagram: observed pneumonia rate against mean score per score bin (the
    bins of the ECE), marker area by the number of studies in the bin."""
    y = np.asarray(labels).astype(float)
    s = np.asarray(scores, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(s, edges[1:-1]), 0, bins - 1)
    mean_score, rate, count = [], [], []
    for b in range(bins):
        mask = which == b
        if mask.any():
            mean_score.append(s[mask].mean())
            rate.append(y[mask].mean())
            count.append(mask.sum())
    with _figure() as (fig, ax):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="perfect calibration")
        sizes = 20 + 200 * np.asarray(count, dtype=float) / max(max(count, default=1), 1)
        ax.plot(mean_score, rate, color="black", lw=1)
        ax.scatter(mean_score, rate, s=sizes, color="black", label="studies per bin (area)")
        ax.set(xlabel="mean score in bin", ylabel="observed pneumonia rate", xlim=(0, 1))
        ax.set(ylim=(-0.02, 1.02))
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=8)
        return _svg(fig)


def histogram_svg(
    groups: Mapping[str, np.ndarray],
    threshold: float | None,
    title: str,
    xlabel: str = "study score",
    styles: Sequence[str] = ("-", "--", "-.", ":"),
) -> str:
    """Overlaid score histograms of named groups (step outlines, counts), with the
    operating threshold as a vertical line."""
    edges = np.linspace(0.0, 1.0, 26)
    palette = [*list(COLOURS.values()), "#2ca02c", "#9467bd"]
    with _figure() as (fig, ax):
        for i, (name, values) in enumerate(groups.items()):
            if len(values):
                ax.hist(
                    np.clip(values, 0, 1),
                    bins=edges,
                    histtype="step",
                    lw=1.5,
                    ls=styles[i % len(styles)],
                    color=palette[i % len(palette)],
                    label=f"{name} (n={len(values)})",
                )
        if threshold is not None:
            ax.axvline(threshold, color="black", lw=0.8, ls=":", label=f"threshold {threshold:.3f}")
        ax.set(xlabel=xlabel, ylabel="studies", xlim=(0, 1))
        ax.set_title(title)
        ax.legend(loc="upper center", fontsize=8)
        return _svg(fig)
