"""`capfleet plan`: how long a caption job of N images takes, and what it costs, on clusters of
several sizes, from one short calibration run of the spec on the machine it runs on.

The calibration runs the spec's own caption job, as a user would (starting or joining Ray,
reading, decoding and captioning with every bundle, writing parts and the summary), on the first
`sample` listed images (into a folder beside the spec's output, removed after), cut into shards
small enough that every worker does several one after another. What each worker does between
the ends of its consecutive shards is the steady cost of an image (reading, decoding, every
model, writing, waiting for the next shard); what the run took beyond that is what every job
pays once (Ray's start, loading the models, the first shards' warm-up, the summary):

    per_image = sum(gaps between a worker's shard ends) / sum(their images)   seconds
    rate      = workers / per_image                                          images/s here
    fixed     = wall - sample / rate                                         seconds
    wall(N, C CPUs) = fixed + N / (rate x C / cpus)

The range is the rate's 95% interval from the spread of those gaps' per-image times (mean +- 2
standard errors). Too small a sample (fewer than MIN_WAVES shards per worker of MIN_SHARD
images) is refused before anything runs.

Assumptions, written out with every plan: the cluster's CPUs are like these (the same model,
the same int8 instructions), the job scales with CPUs at the efficiency measured here (no
object-store, network or storage limit is reached), the images are like the sample (size and
format), and the fixed start-up is the same on a cluster.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq

from capfleet.cluster.connect import cluster_cpus
from capfleet.core.artifacts import cpu_info
from capfleet.core.errors import CapfleetError
from capfleet.jobs.caption.caption_config import PLAN_CPUS, CaptionConfig
from capfleet.jobs.caption.job import duration, run_caption_job
from capfleet.jobs.caption.listing import list_inputs
from capfleet.jobs.caption.parts import part_stats, parts

DEFAULT_SAMPLE = 1024  # images the calibration captions
MIN_SHARD = 8  # images in a calibration shard, at least
MIN_WAVES = 4  # shards per worker, at least: three gaps between their ends


@dataclass(frozen=True)
class Calibration:
    """What the calibration job measured."""

    images: int
    shard_size: int
    wall_s: float
    cpus: float  # the CPUs the calibration ran on
    workers: int  # the workers that captioned its shards
    rate: float  # images/s on those CPUs, start-up excluded
    rate_range: tuple[float, float]  # its 95% interval
    fixed_s: float  # what a job pays once
    stages_ms: dict  # per model: mean read, decode, encoder and decoder ms per image
    machine: dict

    def wall(self, images: int, cpus: float, rate: float | None = None) -> float:
        return self.fixed_s + images / ((rate or self.rate) * cpus / self.cpus)

    def wall_range(self, images: int, cpus: float) -> tuple[float, float]:
        """The estimate's range: the fastest and slowest rate of the interval."""
        lo, hi = self.rate_range
        return self.wall(images, cpus, hi), self.wall(images, cpus, lo)


def shard_size_for(sample: int, cpus: float, largest: int) -> int:
    """Shards that give every worker MIN_WAVES, of MIN_SHARD images or more: as large as that
    allows, since a job's shards (the spec's size) pay their fixed costs over more images."""
    return max(MIN_SHARD, min(largest, sample // (MIN_WAVES * math.ceil(cpus))))


def calibrate(
    cfg: CaptionConfig, sample: int = DEFAULT_SAMPLE, log: Callable[[str], None] = print
) -> Calibration:
    """Run the spec's caption job on its first `sample` images and measure (see the module's
    text); too few images for that is refused before the job starts."""
    cpus = cluster_cpus(cfg.address)
    listed = list_inputs(cfg.input, cfg.split, cfg.shard_size, cfg.image_column).images
    n = min(sample, listed)
    need = MIN_WAVES * MIN_SHARD * math.ceil(cpus)
    if n < need:
        raise CapfleetError(
            f"plan: calibrating on {math.ceil(cpus)} CPUs needs at least {need} images "
            f"({MIN_WAVES} shards of {MIN_SHARD} for each CPU's worker); "
            + (f"--sample is {sample}" if sample < listed else f"{cfg.input} lists {listed}")
        )
    shard = shard_size_for(n, cpus, cfg.shard_size)
    run = replace(cfg, shard_size=shard, limit=n)
    # beside the spec's output (on a cluster, storage every node writes to), removed after
    parent = Path(cfg.out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".capfleet-plan-", dir=parent) as tmp:
        run = replace(run, out=str(Path(tmp) / "run"))
        log(f"plan: calibrating on {n} images in shards of {shard}")
        t0 = time.perf_counter()
        run_caption_job(run, log=lambda _: None)
        wall = time.perf_counter() - t0
        summary = pq.read_table(Path(run.out) / "summary.parquet").to_pylist()
        ends = shard_ends(run.out, [s["model"] for s in summary])
    workers, per_image, spread = steady_cost(ends)
    rate = workers / per_image
    lo, hi = (workers / (per_image + 2 * spread), workers / max(per_image - 2 * spread, 1e-9))
    stages = {
        s["model"]: {k: s.get(k) for k in ("read_ms", "decode_ms", "encoder_ms", "decoder_ms")}
        for s in summary
    }
    return Calibration(
        n,
        shard,
        round(wall, 2),
        cpus,
        workers,
        rate,
        (lo, hi),
        max(0.0, wall - n / rate),
        stages,
        cpu_info(),
    )


def shard_ends(out: str | Path, models: Sequence[str]) -> dict[str, list[tuple[float, int]]]:
    """Per worker, (when it finished a shard with every model, the shard's images)."""
    done: dict[int, list] = {}
    for model in models:
        for path in parts(out, model):
            stats = part_stats(path)
            first = pq.read_table(path, columns=["worker", "shard"]).slice(0, 1).to_pylist()
            if stats is None or stats.retry or not first:
                continue
            shard = first[0]["shard"]
            worker, end, rows = done.get(shard, (first[0]["worker"], 0.0, stats.rows))
            done[shard] = (worker, max(end, stats.finished), rows)
    by_worker: dict[str, list] = defaultdict(list)
    for worker, end, rows in done.values():
        by_worker[worker].append((end, rows))
    return {w: sorted(ends) for w, ends in by_worker.items()}


def steady_cost(ends: dict[str, list[tuple[float, int]]]) -> tuple[int, float, float]:
    """(workers, seconds per image per worker, that figure's standard error) from the gaps
    between each worker's consecutive shard ends."""
    gaps = [
        (b - a, rows)
        for worker_ends in ends.values()
        for (a, _), (b, rows) in zip(worker_ends, worker_ends[1:], strict=False)
    ]
    if len(gaps) < 2:
        raise CapfleetError(
            "plan: the calibration's workers each finished fewer than two shards; "
            "give a larger --sample"
        )
    per_image = sum(g for g, _ in gaps) / sum(r for _, r in gaps)
    spread = statistics.stdev(g / r for g, r in gaps) / math.sqrt(len(gaps))
    return len(ends), per_image, spread


def plan_table(
    cal: Calibration, images: int, cpus: Sequence[float] = PLAN_CPUS, price: float | None = None
) -> list[dict]:
    """One row per cluster size: estimated wall time (and its range), images/s and cost."""
    rows = []
    for c in sorted({cal.cpus, *cpus}):
        wall = cal.wall(images, c)
        row = {
            "cpus": c,
            "wall_s": round(wall, 1),
            "wall_range_s": [round(w, 1) for w in cal.wall_range(images, c)],
            "images_per_s": round(images / wall, 1),
            "cpu_hours": round(wall * c / 3600, 3),
        }
        if price is not None:
            row["cost"] = round(wall * c / 3600 * price, 2)
        rows.append(row)
    return rows


def render_plan(cal: Calibration, images: int, rows: list[dict], price: float | None) -> str:
    m = cal.machine
    lines = [
        f"Plan for {images:,} images "
        f"(calibrated on {m['cpu']}, {cal.cpus:g} CPUs, int8: {m['int8_kind']}):",
        "",
        "| CPUs | wall | range (95%) | images/s | CPU-hours |"
        + (" cost |" if price is not None else ""),
        "|---|---|---|---|---|" + ("---|" if price is not None else ""),
    ]
    for r in rows:
        cost = f" {r['cost']:,.2f} |" if price is not None else ""
        lo, hi = r["wall_range_s"]
        lines.append(
            f"| {r['cpus']:g} | {duration(r['wall_s'])} | {duration(lo)} - {duration(hi)} "
            f"| {r['images_per_s']:,.0f} | {r['cpu_hours']:,.2f} |{cost}"
        )
    lo, hi = cal.rate_range
    lines += [
        "",
        f"Measured: {cal.images} images in {cal.wall_s:.1f} s (shards of {cal.shard_size}, "
        f"{cal.workers} workers): {cal.rate:.1f} images/s on {cal.cpus:g} CPUs "
        f"({lo:.1f} - {hi:.1f}, from the spread of the workers' shard times) after a fixed "
        f"{cal.fixed_s:.1f} s (Ray's start, loading the models, the summary and gallery).",
        "Per image, ms (mean): "
        + "; ".join(
            f"{model}: read {_ms(s['read_ms'])}, decode {_ms(s['decode_ms'])}, encoder "
            f"{_ms(s['encoder_ms'])}, decoder {_ms(s['decoder_ms'])}"
            for model, s in cal.stages_ms.items()
        )
        + ".",
        "Assumes: CPUs like these (model and int8 instructions), throughput growing with "
        "CPUs at the efficiency measured here (no object-store, network or storage limit), "
        "images like the sample, the same fixed start-up on a cluster, shards no slower than "
        "the calibration's" + (f", {price:g} per CPU-hour" if price is not None else "") + ".",
    ]
    return "\n".join(lines)


def _ms(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def plan_json(cal: Calibration, images: int, rows: list[dict], price: float | None) -> str:
    doc = {
        "images": images,
        "price_per_cpu_hour": price,
        "calibration": {
            "images": cal.images,
            "shard_size": cal.shard_size,
            "wall_s": cal.wall_s,
            "cpus": cal.cpus,
            "workers": cal.workers,
            "images_per_s": round(cal.rate, 2),
            "images_per_s_range": [round(r, 2) for r in cal.rate_range],
            "fixed_s": round(cal.fixed_s, 2),
            "stages_ms": cal.stages_ms,
            "machine": cal.machine,
        },
        "plan": rows,
    }
    return json.dumps(doc, indent=1) + "\n"
