"""Trial records -> trials.parquet (schema declared once), report.md in the study's table shape,
and report.png: BLEU-4 against size and against latency with the Pareto front marked.

Sizes are raw bundle bytes unless a column says gzip; a gzip saving is never a speed-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfleet.model.artifacts import write_bytes_atomic, write_parquet_atomic
from capfleet.model.errors import CapfleetError

TRIALS_FILE, REPORT_FILE, PLOT_FILE = "trials.parquet", "report.md", "report.png"
BASELINE = "fp32:fp32"

# One row per (model, trial). Deltas are against the same model's fp32:fp32 trial.
TRIAL_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("trial", pa.string()),  # "ENCODER:DECODER" recipes, e.g. "int8:qat-int8"
        ("encoder_recipe", pa.string()),
        ("decoder_recipe", pa.string()),
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),
        ("bundle", pa.string()),
        ("size_mb", pa.float64()),  # raw bytes of the bundle's files, decimal MB
        ("gzip_mb", pa.float64()),
        ("encoder_mb", pa.float64()),
        ("encoder_gzip_mb", pa.float64()),
        ("decoder_mb", pa.float64()),
        ("decoder_gzip_mb", pa.float64()),
        ("encoder_sparsity", pa.float64()),  # share of zero kernel weights
        ("decoder_sparsity", pa.float64()),
        ("encoder_ms", pa.float64()),  # per image, at bench_batch with bench_threads
        ("decoder_ms", pa.float64()),  # greedy decoding, per image
        ("e2e_ms", pa.float64()),  # encoder + decoder together, per image
        ("bench_batch", pa.int32()),
        ("bench_threads", pa.int32()),
        ("bleu1", pa.float64()),  # the bundle's own captions of the test split
        ("bleu2", pa.float64()),
        ("bleu3", pa.float64()),
        ("bleu4", pa.float64()),
        ("content_accuracy", pa.float64()),  # shapes data only
        ("test_images", pa.int64()),
        ("size_ratio", pa.float64()),  # size_mb / baseline size_mb
        ("gzip_ratio", pa.float64()),
        ("speedup", pa.float64()),  # baseline e2e_ms / e2e_ms
        ("delta_bleu4", pa.float64()),  # bleu4 - baseline bleu4
        ("wall_s", pa.float64()),  # the trial's own wall time (tuning, converting, scoring)
        ("started", pa.float64()),  # Unix time the trial's task began and ended
        ("finished", pa.float64()),
    ]
)


def failed_record(model: str, trial: str, error: str) -> dict:
    return {"model": model, "trial": trial, "status": "error", "error": error}


def with_deltas(records: Sequence[dict]) -> list[dict]:
    """Records with every schema column, deltas filled against their model's baseline."""
    base = {r["model"]: r for r in records if r["trial"] == BASELINE and r["status"] == "ok"}
    out = []
    for r in records:
        row = {name: r.get(name) for name in TRIAL_SCHEMA.names}
        b = base.get(r["model"])
        if b and r["status"] == "ok":
            row["size_ratio"] = r["size_mb"] / b["size_mb"]
            row["gzip_ratio"] = r["gzip_mb"] / b["gzip_mb"]
            row["speedup"] = b["e2e_ms"] / r["e2e_ms"] if r["e2e_ms"] else None
            row["delta_bleu4"] = r["bleu4"] - b["bleu4"]
        out.append(row)
    return out


def write_trials(out: str | Path, records: Sequence[dict]) -> pa.Table:
    table = pa.Table.from_pylist(with_deltas(records), schema=TRIAL_SCHEMA)
    write_parquet_atomic(Path(out) / TRIALS_FILE, table)
    return table


def read_trials(out: str | Path) -> list[dict]:
    p = Path(out) / TRIALS_FILE
    if not p.is_file():
        raise CapfleetError(f"{out}: no {TRIALS_FILE} (run `capfleet compress` into it first)")
    return pq.read_table(p).to_pylist()


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower x (cost) and higher y (BLEU)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def minutes_per_2000(ms_per_image: float) -> float:
    return ms_per_image * 2000 / 60000


def _f(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def label(r: dict) -> str:
    """ "int8" for "int8:int8"; the full "ENCODER:DECODER" where the parts differ."""
    enc, _, dec = r["trial"].partition(":")
    return enc if enc == dec else r["trial"]


def render_markdown(rows: Sequence[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    lines = [
        "# Compression trials",
        "",
        "BLEU is the bundle's own greedy captions of the test split; size is the raw bundle",
        "(encoder.tflite + decoder_step.tflite + vocab.json), gzip beside it (a gzip saving",
        "is a download saving, not a speed-up); time for 2000 images is the end-to-end LiteRT",
        "latency per image, measured for one bundle at a time with nothing else running, at",
        "the benchmark batch and thread count, times 2000. Deltas are against the same",
        "model's fp32:fp32 trial; x size and speed-up are ratios to it.",
        "",
        "| model | trial (encoder:decoder) | BLEU-1 | BLEU-4 | size MB | gzip MB |"
        " time for 2000 images (min) | x size | speed-up | ΔBLEU-4 | sparsity enc/dec |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(ok, key=lambda r: (r["model"], r["size_mb"])):
        lines.append(
            f"| {r['model']} | {label(r)} | {_f(r['bleu1'], '.3f')} | {_f(r['bleu4'], '.3f')} "
            f"| {_f(r['size_mb'], '.3f')} | {_f(r['gzip_mb'], '.3f')} "
            f"| {_f(minutes_per_2000(r['e2e_ms']), '.3f')} | {_f(r['size_ratio'], '.2f')} "
            f"| {_f(r['speedup'], '.2f')} | {_f(r['delta_bleu4'], '+.3f')} "
            f"| {_f(r['encoder_sparsity'], '.2f')}/{_f(r['decoder_sparsity'], '.2f')} |"
        )
    if ok:
        r0 = ok[0]
        lines += [
            "",
            f"Latency measured at batch {r0['bench_batch']} with {r0['bench_threads']} "
            f"interpreter thread(s); {r0['test_images']} test images scored.",
        ]
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- {r['model']} {r['trial']}: {r['error']}" for r in failed]
    for model in sorted({r["model"] for r in ok}):
        pts = [r for r in ok if r["model"] == model]
        front = [label(pts[i]) for i in pareto([(r["size_mb"], r["bleu4"]) for r in pts])]
        fast = [label(pts[i]) for i in pareto([(r["e2e_ms"], r["bleu4"]) for r in pts])]
        lines += [
            "",
            f"Pareto front for {model}: size vs BLEU-4: {', '.join(front)}; "
            f"latency vs BLEU-4: {', '.join(fast)}.",
        ]
    lines += ["", f"![BLEU-4 against size and latency]({PLOT_FILE})", ""]
    return "\n".join(lines)


def render_plot(rows: Sequence[dict], width: int = 1100, height: int = 460) -> bytes:
    """Two scatter panels drawn with Pillow: BLEU-4 vs size (MB) and vs ms/image, log x axes;
    Pareto-front points filled and joined, the rest hollow. Returns PNG bytes."""
    import io

    from PIL import Image, ImageDraw

    ok = [r for r in rows if r["status"] == "ok" and r["size_mb"] and r["e2e_ms"]]
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    models = sorted({r["model"] for r in ok})
    panels = [("size_mb", "bundle size (MB, raw, log)"), ("e2e_ms", "ms per image (log)")]
    pw = (width - 60) // 2
    for p, (key, axis) in enumerate(panels):
        x0, y0, x1, y1 = 60 + p * (pw + 20), 30, 60 + p * (pw + 20) + pw - 40, height - 60
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0 + (x1 - x0) // 2 - 60, y1 + 30), axis, fill="black")
        draw.text((x0 - 55, y0 - 20), "BLEU-4", fill="black")
        if not ok:
            continue
        xs = [math.log10(r[key]) for r in ok]
        ys = [r["bleu4"] for r in ok]
        xlo, xhi = min(xs), max(xs)
        ylo, yhi = min(ys), max(ys)
        xpad, ypad = (xhi - xlo) * 0.1 or 0.5, (yhi - ylo) * 0.1 or 0.05
        xlo, xhi, ylo, yhi = xlo - xpad, xhi + xpad, ylo - ypad, yhi + ypad

        def at(xv, yv, x0=x0, x1=x1, y0=y0, y1=y1, xlo=xlo, xhi=xhi, ylo=ylo, yhi=yhi):
            return (
                x0 + (xv - xlo) / (xhi - xlo) * (x1 - x0),
                y1 - (yv - ylo) / (yhi - ylo) * (y1 - y0),
            )

        for t in range(5):  # axis ticks
            yv = ylo + (yhi - ylo) * t / 4
            _, py = at(xlo, yv)
            draw.line([x0 - 4, py, x0, py], fill="black")
            draw.text((x0 - 40, py - 6), f"{yv:.3f}", fill="black")
            xv = xlo + (xhi - xlo) * t / 4
            px, _ = at(xv, ylo)
            draw.line([px, y1, px, y1 + 4], fill="black")
            draw.text((px - 15, y1 + 8), f"{10**xv:.3g}", fill="black")
        for m, model in enumerate(models):
            colour = palette[m % len(palette)]
            pts = [r for r in ok if r["model"] == model]
            front = set(pareto([(r[key], r["bleu4"]) for r in pts]))
            line = sorted(at(math.log10(pts[i][key]), pts[i]["bleu4"]) for i in front)
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            for i, r in enumerate(pts):
                px, py = at(math.log10(r[key]), r["bleu4"])
                box = [px - 5, py - 5, px + 5, py + 5]
                draw.ellipse(box, fill=colour if i in front else None, outline=colour, width=2)
                draw.text((px + 7, py - 6), label(r), fill=colour)
            if p == 0:
                draw.text((x0 + 8, y0 + 8 + 14 * m), f"{model} (filled: Pareto front)", fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_report(out: str | Path) -> Path:
    """report.md and report.png from OUT/trials.parquet; returns the report's path."""
    rows = read_trials(out)
    write_bytes_atomic(Path(out) / PLOT_FILE, render_plot(rows))
    path = Path(out) / REPORT_FILE
    write_bytes_atomic(path, render_markdown(rows).encode())
    return path
