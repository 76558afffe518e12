"""Charts as inline SVG, and the page frame, for the self-contained HTML pages
(``report.html``, ``evaluation.html``).

The pages are opened from a file share on a hospital workstation with no network, so each
chart is an SVG string put straight into the page: no script, no CDN, no image file beside it.
matplotlib draws them (Agg, no display needed); text stays text (``svg.fonttype = none``),
which keeps the files small and the numbers searchable.
"""

from __future__ import annotations

import html
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


def _integer_ticks(ax: Any) -> None:
    """Counts have whole-number ticks (no 0.25 of a study)."""
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _sparse_xticks(ax: Any, positions: np.ndarray, labels: Sequence[str]) -> None:
    """At most about 12 slanted labels along an ordered x axis (weeks, runs)."""
    step = max(1, len(labels) // 12)
    ax.set_xticks(positions[::step], [labels[i] for i in range(0, len(labels), step)])
    ax.tick_params(axis="x", labelsize=7, rotation=30)


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


def rocs_svg(labels: np.ndarray, curves: Mapping[str, np.ndarray], title: str) -> str:
    """ROC curves of several models' `curves` (``{name: scores}``) on the same studies."""
    with _figure() as (fig, ax):
        for (name, scores), (colour, style) in zip(
            curves.items(), (("black", "-"), ("tab:red", "--"), ("tab:blue", "-.")), strict=False
        ):
            fpr, tpr = roc_curve(labels, scores)
            ax.plot(fpr, tpr, color=colour, ls=style, lw=1.5, label=name)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance")
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
) -> str:
    """Overlaid score histograms of named groups of raw scores (counted here, in 25 bins on
    [0, 1], and drawn by :func:`binned_svg`)."""
    edges = np.linspace(0.0, 1.0, 26)
    counts = {
        name: np.histogram(np.clip(values, 0, 1), bins=edges)[0] for name, values in groups.items()
    }
    return binned_svg(counts, edges, threshold, title, xlabel=xlabel)


def binned_svg(
    groups: Mapping[str, Sequence[int]],
    edges: np.ndarray,
    threshold: float | None,
    title: str,
    *,
    normalize: bool = False,
    xlabel: str = "study score",
) -> str:
    """Step outlines of histograms already counted per bin (in SQL), one per group;
    `normalize` shows each group as a share of its own total, so groups of very different
    sizes (devices, model versions) can be compared."""
    palette = [*COLOURS.values(), "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
    styles = ("-", "--", "-.", ":")
    with _figure() as (fig, ax):
        for i, (name, counts) in enumerate(groups.items()):
            values = np.asarray(counts, dtype=float)
            total = values.sum()
            if total == 0:
                continue
            heights = values / total if normalize else values
            ax.stairs(
                heights,
                edges,
                lw=1.5,
                ls=styles[i % len(styles)],
                color=palette[i % len(palette)],
                label=f"{name} (n={int(total)})",
            )
        if threshold is not None:
            ax.axvline(threshold, color="black", lw=0.8, ls=":", label=f"threshold {threshold:.3f}")
        ax.set(xlabel=xlabel, ylabel="share of studies" if normalize else "studies")
        if not normalize:
            _integer_ticks(ax)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_title(title)
        ax.legend(loc="upper center", fontsize=7)
        return _svg(fig)


def bars_svg(
    labels: Sequence[str], series: Mapping[str, Sequence[float]], title: str, ylabel: str
) -> str:
    """Side-by-side bars per label (e.g. studies scored and flagged per week)."""
    x = np.arange(len(labels))
    width = 0.8 / max(len(series), 1)
    palette = ["#7f7f7f", COLOURS[1], COLOURS[0]]
    with _figure() as (fig, ax):
        fig.set_size_inches(9.0, 3.2)
        for i, (name, values) in enumerate(series.items()):
            ax.bar(x + i * width, values, width, label=name, color=palette[i % len(palette)])
        _sparse_xticks(ax, x + 0.4 - width / 2, labels)
        ax.set(ylabel=ylabel)
        _integer_ticks(ax)
        ax.set_title(title)
        ax.legend(fontsize=8)
        return _svg(fig)


def lines_svg(
    x: Sequence[str], series: Mapping[str, Sequence[float | None]], title: str, ylabel: str
) -> str:
    """Lines over an ordered x axis (e.g. the flag rate per run, one line per model)."""
    positions = np.arange(len(x))
    with _figure() as (fig, ax):
        fig.set_size_inches(9.0, 3.2)
        for name, values in series.items():
            y = np.array([np.nan if v is None else v for v in values], dtype=float)
            ax.plot(positions, y, marker="o", ms=3, lw=1, label=name)
        _sparse_xticks(ax, positions, x)
        ax.set(ylabel=ylabel, ylim=(0, 1))
        ax.set_title(title)
        ax.legend(fontsize=7)
        return _svg(fig)


def band_svg(
    x: Sequence[str],
    values: Sequence[float | None],
    low: Sequence[float | None],
    high: Sequence[float | None],
    title: str,
    ylabel: str,
) -> str:
    """One line over an ordered x axis with its interval as a shaded band (e.g. the AUC per
    month with its 95 % CI); a point without an interval is drawn without a band."""
    positions = np.arange(len(x))

    def floats(seq: Sequence[float | None]) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in seq], dtype=float)

    y, lo, hi = floats(values), floats(low), floats(high)
    with _figure() as (fig, ax):
        fig.set_size_inches(9.0, 3.2)
        ax.fill_between(positions, lo, hi, color=COLOURS[0], alpha=0.2, lw=0, label="95 % CI")
        ax.plot(positions, y, marker="o", ms=3, lw=1, color=COLOURS[0], label=ylabel)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
        _sparse_xticks(ax, positions, x)
        ax.set(ylabel=ylabel, ylim=(0, 1.02))
        ax.set_title(title)
        ax.legend(fontsize=7, loc="lower left")
        return _svg(fig)


def signals_svg(
    x: Sequence[str],
    signals: Mapping[str, Mapping[str, Sequence[Any]]],
    title: str,
    columns: int = 4,
) -> str:
    """Small multiples over an ordered x axis, one panel per signal (its own y scale, since
    a share's change and a KS distance are not on one): the ``statistic`` (line), the
    ``threshold`` it had to exceed, with the band above it shaded (the alarm band), the
    ``reference`` periods shaded grey, and the periods of an ``alarm`` marked in red. Each
    signal maps those four names to values aligned with `x` (None where it has no row)."""
    positions = np.arange(len(x))
    rows = max(1, -(-len(signals) // columns))

    def floats(seq: Sequence[Any]) -> np.ndarray:
        return np.array([np.nan if v is None else float(v) for v in seq], dtype=float)

    with _figure() as (fig, _):
        fig.clf()
        fig.set_size_inches(9.6, 1.7 * rows + 0.5)
        axes = fig.subplots(rows, columns, sharex=True, squeeze=False)
        for ax, (name, series) in zip(axes.flat, signals.items(), strict=False):
            statistic, threshold = floats(series["statistic"]), floats(series["threshold"])
            alarm = np.array([bool(v) for v in series["alarm"]])
            reference = np.array([bool(v) for v in series["reference"]])
            top = np.nanmax(np.r_[statistic, threshold, 0.0]) * 1.15 or 1.0
            for start, stop in _runs(reference):
                ax.axvspan(start - 0.5, stop - 0.5, color="#7f7f7f", alpha=0.18, lw=0)
            judged = ~reference  # the reference's periods are not judged: no band there
            ax.fill_between(  # a step per period: its own threshold, from its n
                positions, threshold, top, where=judged, step="mid", color=COLOURS[1], alpha=0.1
            )
            ax.plot(positions, threshold, color=COLOURS[1], lw=0.8, ls="--", ds="steps-mid")
            ax.plot(positions, statistic, color="black", lw=0.9, marker="o", ms=1.5)
            ax.plot(positions[alarm], statistic[alarm], "o", color=COLOURS[1], ms=4)
            ax.set_ylim(0, top)
            ax.set_title(name, fontsize=8, pad=2)
            ax.tick_params(axis="y", labelsize=6)
        for ax in list(axes.flat)[len(signals) :]:
            ax.set_visible(False)
        step = max(1, len(x) // 4)
        # the lowest shown panel of each column carries the dates (a last row that is not
        # full leaves them to the row above in its empty columns)
        for column in range(columns):
            shown = [r for r in range(rows) if r * columns + column < len(signals)]
            if not shown:
                continue
            ax = axes[shown[-1]][column]
            ax.set_xticks(positions[::step], [x[i] for i in range(0, len(x), step)])
            ax.tick_params(axis="x", labelsize=6, rotation=30, labelbottom=True)
        if len(x):
            axes[0][0].set_xlim(-0.5, len(x) - 0.5)
        fig.suptitle(title, fontsize=9)
        return _svg(fig)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The (start, stop) of each run of true values in `mask`."""
    edges = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


#: The style of every page: readable on a workstation screen and in a printout.
STYLE: Final = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.n{text-align:right}
.small{font-size:.8em}
.charts{display:flex;flex-wrap:wrap;gap:1em}.charts svg{max-width:100%;height:auto}
.note{color:#555;font-size:.9em}code{background:#f3f3f3;padding:0 .2em}
.sheet{display:flex;flex-wrap:wrap;gap:.6em}.sheet figure{margin:0;text-align:center;
font-size:.75em;width:100px}.sheet img{width:96px;height:96px;image-rendering:pixelated;
border:1px solid #999}
.maps figure{width:auto}.maps img.map{width:256px;height:256px;image-rendering:auto;
margin-right:.3em}.maps img{vertical-align:top}
.warn{border:2px solid #b00;background:#fff4f4;padding:.2em 1em;margin:1em 0}
.warn h2{color:#b00;border-bottom-color:#e8b4b4}tr.flag td{background:#fde2e2}
.ok{border:2px solid #070;background:#f2fbf2;padding:.2em 1em;margin:1em 0}
.periods td:first-child{white-space:nowrap}
"""


def page(title: str, body: str) -> str:
    """A whole self-contained HTML page: inline style, no script, no outside resource."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
        f"{body}\n</body></html>\n"
    )


def figure(caption: str, model_input: str | None, overlay: str | None = None) -> str:
    """One shown image: its map over the picture (when drawn) and its 64 x 64 model input,
    both inline images, with a caption; a plain "not available" box without a picture."""
    pictures = (
        f'<img class="map" alt="where the score came from" src="{overlay}">' if overlay else ""
    )
    pictures += (
        f'<img alt="model input" src="{model_input}">'
        if model_input
        else '<div class="note" style="width:96px;height:96px">not available</div>'
    )
    return f"<figure>{pictures}<figcaption>{html.escape(caption)}</figcaption></figure>"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table of escaped cells (floats with three decimals)."""

    def cell(value: object) -> str:
        if value is None:
            return "<td></td>"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"<td>{html.escape(str(value))}</td>"
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return f'<td class="n">{text}</td>'  # numbers right-aligned, to compare by eye

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
