"""A compress run's report: report.md in the study's table shape, and report.png (matplotlib):
BLEU-4 and CIDEr-D against size and against latency with the Pareto front marked; where a trial
has a mixed-int8 part, a layer sensitivity section and sensitivity.png. The records,
trials.parquet and sensitivity.parquet are compression/records.py's.

Sizes are raw bundle bytes unless a column says gzip; a gzip saving is never a speed-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from capfleet.compression.records import (
    SENSITIVITY_FILE,
    label,
    minutes_per_2000,
    pareto,
    read_trials,
)
from capfleet.core.artifacts import write_bytes_atomic
from capfleet.core.storage import place, read_parquet

REPORT_FILE, PLOT_FILE, SENSITIVITY_PLOT = "report.md", "report.png", "sensitivity.png"
SHOWN_OPS = 8  # the most sensitive ops per part in report.md and sensitivity.png


def _f(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _fronts(pts: Sequence[dict], cost: str, score: str) -> str:
    have = [r for r in pts if r.get(score) is not None]
    return ", ".join(label(have[i]) for i in pareto([(r[cost], r[score]) for r in have])) or "-"


def render_markdown(rows: Sequence[dict], gallery: str | None = None) -> str:
    """report.md's text; `gallery` names the gallery page beside it, where there is one."""
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    lines = [
        "# Compression trials",
        "",
        "Scores are the bundle's own greedy captions of the test split: corpus BLEU-1/4,",
        "CIDEr-D and ROUGE-L (the COCO caption evaluation's definitions). Every trial of a",
        "model captions the same test images, so its scores compare across trials; CIDEr-D",
        "weighs n-grams by their rarity among those images' references, so a CIDEr-D figure",
        "compares only with figures on the same image set, never with another data set's or",
        "another eval_images'. Size is the raw bundle",
        "(encoder.tflite + decoder_step.tflite + vocab.json), gzip beside it (a gzip saving",
        "is a download saving, not a speed-up); time for 2000 images is the end-to-end LiteRT",
        "latency per image, measured for one bundle at a time with nothing else running, at",
        "the benchmark batch and thread count, times 2000. Deltas are against the same",
        "model's fp32:fp32 trial; x size and speed-up are ratios to it.",
        "",
        "| model | trial (encoder:decoder) | BLEU-1 | BLEU-4 | CIDEr-D | ROUGE-L | size MB |"
        " gzip MB | time for 2000 images (min) | x size | speed-up | ΔBLEU-4 | ΔCIDEr-D |"
        " sparsity enc/dec |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(ok, key=lambda r: (r["model"], r["size_mb"])):
        lines.append(
            f"| {r['model']} | {label(r)} | {_f(r['bleu1'], '.3f')} | {_f(r['bleu4'], '.3f')} "
            f"| {_f(r.get('cider_d'), '.3f')} | {_f(r.get('rouge_l'), '.3f')} "
            f"| {_f(r['size_mb'], '.3f')} | {_f(r['gzip_mb'], '.3f')} "
            f"| {_f(minutes_per_2000(r['e2e_ms']), '.3f')} | {_f(r['size_ratio'], '.2f')} "
            f"| {_f(r['speedup'], '.2f')} | {_f(r['delta_bleu4'], '+.3f')} "
            f"| {_f(r.get('delta_cider_d'), '+.3f')} "
            f"| {_f(r['encoder_sparsity'], '.2f')}/{_f(r['decoder_sparsity'], '.2f')} |"
        )
    if ok:
        r0 = ok[0]
        scored = {}
        for r in ok:
            scored.setdefault(r["model"], set()).add(r["test_images"])
        sets = "; ".join(
            f"{m}: {', '.join(str(n) for n in sorted(ns))}"
            + ("" if len(ns) == 1 else " (different image sets: do not compare its trials)")
            for m, ns in sorted(scored.items())
        )
        lines += [
            "",
            f"Latency measured at batch {r0['bench_batch']} with {r0['bench_threads']} "
            f"interpreter thread(s). Test images scored per model: {sets}.",
        ]
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- {r['model']} {r['trial']}: {r['error']}" for r in failed]
    for model in sorted({r["model"] for r in ok}):
        pts = [r for r in ok if r["model"] == model]
        lines += [
            "",
            f"Pareto front for {model}: size vs BLEU-4: {_fronts(pts, 'size_mb', 'bleu4')}; "
            f"latency vs BLEU-4: {_fronts(pts, 'e2e_ms', 'bleu4')}; "
            f"size vs CIDEr-D: {_fronts(pts, 'size_mb', 'cider_d')}; "
            f"latency vs CIDEr-D: {_fronts(pts, 'e2e_ms', 'cider_d')}.",
        ]
    lines += ["", f"![BLEU-4 and CIDEr-D against size and latency]({PLOT_FILE})", ""]
    if gallery:
        lines += [
            f"Every trial's captions of a sample of the test images, side by side: "
            f"[{gallery}]({gallery}) (open it in a browser; it needs no server).",
            "",
        ]
    return "\n".join(lines)


# The report plot's panels: (score column, its label) x (cost column, its axis).
PLOT_SCORES = (("bleu4", "BLEU-4"), ("cider_d", "CIDEr-D"))
PLOT_COSTS = (
    ("size_mb", "bundle size (MB, raw, log scale)"),
    ("e2e_ms", "ms per image (log scale)"),
)


def render_plot(rows: Sequence[dict]) -> bytes:
    """PNG bytes: BLEU-4 and CIDEr-D against bundle size and against latency (log x), one
    colour per model, every point labelled with its trial, the Pareto front filled and joined
    (the rest hollow)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from capfleet.jobs.plots import PALETTE, figure_png, new_figure

    ok = [r for r in rows if r["status"] == "ok" and r.get("size_mb") and r.get("e2e_ms")]
    models = sorted({r["model"] for r in ok})
    fig = new_figure(13, 9.5, layout=None)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.92, hspace=0.3, wspace=0.15)
    axes = fig.subplots(len(PLOT_SCORES), len(PLOT_COSTS), squeeze=False)
    for (score, score_label), row in zip(PLOT_SCORES, axes, strict=True):
        for (cost, cost_label), ax in zip(PLOT_COSTS, row, strict=True):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(cost_label)
            ax.set_ylabel(score_label)
            ax.grid(alpha=0.3, which="both")
            ax.set_title(f"{score_label} against {cost_label.split(' (')[0]}")
            for m, model in enumerate(models):
                colour = PALETTE[m % len(PALETTE)]
                pts = [r for r in ok if r["model"] == model and r.get(score) is not None]
                front = set(pareto([(r[cost], r[score]) for r in pts]))
                line = sorted((pts[i][cost], pts[i][score]) for i in front)
                if len(line) > 1:
                    ax.plot(*zip(*line, strict=True), color=colour, lw=1.5, alpha=0.8)
                for i, r in enumerate(pts):
                    ax.scatter(
                        r[cost],
                        r[score],
                        s=55,
                        color=colour if i in front else "white",
                        edgecolors=colour,
                        linewidths=1.8,
                        zorder=3,
                    )
                    ax.annotate(
                        label(r),
                        (r[cost], r[score]),
                        xytext=(6, 5),
                        textcoords="offset points",
                        fontsize=8.5,
                        color=colour,
                    )
            if not ok:
                ax.text(0.5, 0.5, "no successful trial", transform=ax.transAxes, ha="center")
            elif models:
                ax.margins(x=0.15, y=0.12)  # room for the labels at the edges
    if models:
        from matplotlib.lines import Line2D

        dot = {"marker": "o", "linestyle": "", "markersize": 8, "markeredgewidth": 1.8}
        handles = [
            Line2D([], [], color=PALETTE[m % len(PALETTE)], label=model, **dot)
            for m, model in enumerate(models)
        ]
        handles.append(
            Line2D([], [], color="grey", markerfacecolor="white", label="not on the front", **dot)
        )
        axes[0][0].legend(handles=handles, title="filled: Pareto front", fontsize=9, loc="best")
    images = sorted({r["test_images"] for r in ok if r.get("test_images")})
    fig.suptitle(
        "Compression trials: quality against cost, on "
        + (f"the same {images[0]} test images" if len(images) == 1 else "the test split")
    )
    return figure_png(fig)


def _groups(rows: Sequence[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Sensitivity rows by (model, trial, part), each worst first."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["rank"]):
        groups.setdefault((r["model"], r["trial"], r["part"]), []).append(r)
    return groups


def render_sensitivity(rows: Sequence[dict]) -> str:
    """report.md's layer sensitivity section."""
    lines = [
        "",
        "## Layer sensitivity",
        "",
        "Each op of a mixed part quantized to int8 alone, every other op float: the part's",
        "outputs against float on the calibration samples (SNR in dB: lower is worse). The",
        "mixed bundle keeps the worst ops out of int8 (kept as float32 or int16x8). For the",
        "few worst, the whole model's dev BLEU-4 and CIDEr-D with that op alone int8, against",
        "the model all float (dev Δ). All of them: sensitivity.parquet.",
    ]
    for (model, trial, part), group in _groups(rows).items():
        lines += [
            "",
            f"{model} {trial}, {part}:",
            "",
            "| rank | layer | op | SNR dB | cosine | dev ΔBLEU-4 | dev ΔCIDEr-D | kept as |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['rank']} | {r['node']} | {r['op']} | {_f(r['snr_db'], '.1f')} "
            f"| {_f(r['cosine'], '.6f')} | {_f(r.get('dev_bleu4_delta'), '+.4f')} "
            f"| {_f(r.get('dev_cider_d_delta'), '+.3f')} | {r.get('kept_as') or ''} |"
            for r in group[:SHOWN_OPS]
        ]
    lines += ["", f"![The most sensitive ops of each mixed part]({SENSITIVITY_PLOT})", ""]
    return "\n".join(lines)


def render_sensitivity_plot(rows: Sequence[dict]) -> bytes:
    """sensitivity.png: per mixed part, its most sensitive ops' SNR as bars, worst on top."""
    from capfleet.jobs.plots import PALETTE, figure_png, new_figure

    groups = list(_groups(rows).items())
    fig = new_figure(9, 0.6 + 2.4 * len(groups))
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    for ax, ((model, trial, part), group) in zip(axes, groups, strict=True):
        shown = [r for r in group[:SHOWN_OPS] if r["snr_db"] is not None]
        ax.barh(
            [r["node"] for r in shown],
            [r["snr_db"] for r in shown],
            color=[PALETTE[1] if r["kept"] else PALETTE[0] for r in shown],
        )
        ax.invert_yaxis()
        ax.set_title(f"{model} {trial}: {part} (kept out of int8 in orange)", fontsize=10)
        ax.set_xlabel("SNR of the part's outputs with the op alone int8 (dB)")
        ax.tick_params(axis="y", labelsize=8)
    return figure_png(fig)


def write_report(out: str | Path) -> Path:
    """report.md and report.png from OUT/trials.parquet (with the layer sensitivity section and
    sensitivity.png where OUT/sensitivity.parquet is); returns the report's path. The report
    links OUT/gallery.html where the run wrote one."""
    from capfleet.jobs.gallery import GALLERY_FILE

    rows = read_trials(out)
    write_bytes_atomic(place(out) / PLOT_FILE, render_plot(rows))
    path = place(out) / REPORT_FILE
    gallery = GALLERY_FILE if (place(out) / GALLERY_FILE).is_file() else None
    text = render_markdown(rows, gallery)
    sensitivity = place(out) / SENSITIVITY_FILE
    if sensitivity.is_file():
        found = read_parquet(sensitivity).to_pylist()
        text += render_sensitivity(found)
        write_bytes_atomic(place(out) / SENSITIVITY_PLOT, render_sensitivity_plot(found))
    else:
        (place(out) / SENSITIVITY_PLOT).unlink(missing_ok=True)
    write_bytes_atomic(path, text.encode())
    return path
