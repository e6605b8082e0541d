"""Plots for reports, drawn with matplotlib on its Agg canvas: no display and no pyplot state,
so they render the same in a Ray worker, a driver or a test. `plot_latency` draws each model's
per-image latency distribution of a caption job from plain arrays."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from capfleet.core.artifacts import write_bytes_atomic
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import place

# matplotlib's "tab10" colours: one per model, the same order in every plot.
PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


CDF_POINTS = 2000  # quantiles drawn per model in the cumulative plot
MAX_FLIERS_FROM = 20_000  # beyond this many images, outliers are too many to draw one by one


def new_figure(
    width_in: float, height_in: float, dpi: int = 100, layout: str | None = "constrained"
):
    """A matplotlib Figure on an Agg canvas (pyplot is never imported: no backend to pick)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_latency(
    latencies_ms: Mapping[str, Sequence[float]], title: str = "", counted: str = "images"
) -> bytes:
    """PNG bytes of each model's latency distribution: a box plot per model with its p50 and
    p95 written beside it (outliers drawn up to MAX_FLIERS_FROM values), and the cumulative
    share of the values (of `counted`: images, or model calls) under each latency."""
    data = {}
    for model, values in latencies_ms.items():
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if len(v) == 0:
            raise CapfleetError(f"latency plot: model {model!r} has no finite latency")
        if (v < 0).any():
            raise CapfleetError(f"latency plot: model {model!r} has a negative latency")
        data[str(model)] = v
    if not data:
        raise CapfleetError("latency plot: no models")
    names = list(data)
    fig = new_figure(12, max(3.5, 1.2 + 0.6 * len(names)))
    box, cdf = fig.subplots(1, 2)
    parts = box.boxplot(
        [data[n] for n in names],
        orientation="horizontal",
        tick_labels=names,
        showfliers=max(len(v) for v in data.values()) <= MAX_FLIERS_FROM,
        patch_artist=True,
        widths=0.6,
    )
    for i, patch in enumerate(parts["boxes"]):
        patch.set_facecolor(PALETTE[i % len(PALETTE)] + "55")
        patch.set_edgecolor(PALETTE[i % len(PALETTE)])
    for i, n in enumerate(names, 1):
        p50, p95 = np.percentile(data[n], [50, 95])
        box.annotate(
            f"p50 {p50:.2f}  p95 {p95:.2f} ms  ({len(data[n])} {counted})",
            (1.0, i),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 10),
            textcoords="offset points",
            ha="right",
            fontsize=9,
        )
    box.invert_yaxis()  # the first model on top, as listed
    box.set_xlabel("ms per image")
    box.set_title("latency per model")
    box.grid(axis="x", alpha=0.3)
    for i, n in enumerate(names):
        # at most CDF_POINTS quantiles: a million-image job draws as fast as a small one
        share = np.linspace(0.0, 1.0, min(len(data[n]), CDF_POINTS))
        v = np.quantile(data[n], share)
        cdf.plot(v, share, label=n, color=PALETTE[i % len(PALETTE)], drawstyle="steps-post")
    lo = min(float(v.min()) for v in data.values())
    hi = max(float(v.max()) for v in data.values())
    if lo > 0 and hi / lo > 20:  # a long tail: a log axis keeps the bulk readable
        from matplotlib.ticker import FuncFormatter

        cdf.set_xscale("log")
        cdf.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    cdf.set_xlabel("ms per image")
    cdf.set_ylabel(f"share of {counted} at or under")
    cdf.set_ylim(0, 1.02)
    cdf.grid(alpha=0.3)
    cdf.legend(loc="lower right", fontsize=9)
    cdf.set_title("cumulative distribution")
    if title:
        fig.suptitle(title)
    return figure_png(fig)


def plot_latency(
    latencies_ms: Mapping[str, Sequence[float]],
    path: str | Path,
    title: str = "",
    counted: str = "images",
) -> Path:
    """Write each model's latency distribution ({model: ms per image, one value per image or
    per model call}) as a PNG at `path`."""
    path = place(path)
    write_bytes_atomic(path, render_latency(latencies_ms, title, counted))
    return path
