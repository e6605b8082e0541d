"""`capfleet plan`: how long a caption job of N images takes, and what it costs, on clusters of
several sizes, from short calibration runs of the spec on the machine it runs on.

The calibration runs the spec's own caption job as a user would (each run starting or joining
Ray, reading, decoding and captioning with every bundle, writing parts and the summary), on the
first quarter of `sample` listed images, on all `sample` of them, then on the quarter again
(into a folder beside the spec's output, removed after); too few images for that are refused
before the first run. In a session already connected to Ray a short warm-up job runs first, so
that the first timed run does not pay for starting what the others reuse. Two sizes separate
what every job pays once (Ray's start, the actors' model loading, the summary and gallery)
from what each image costs; the repeated run says how much a run's wall moves by itself:

    wall1 = the mean of the two n1 runs; moved = their difference
    rate  = (n2 - n1) / (wall2 - wall1)       images/s on the CPUs calibrated on
    range = (n2 - n1) / (wall2 - wall1 -+ moved)
    (every run in shards of n1 / CPUs at most, so that every CPU has work from the start)
    fixed = wall1 - n1 / rate                 seconds
    wall(N, C CPUs) = fixed + N / (rate x C / cpus)

Assumptions, written out with every plan: the cluster's CPUs are like these (the same model,
the same int8 instructions), the job scales with CPUs at the efficiency measured here (no
object-store, network or storage limit is reached), the images are like the sample (size and
format), and the fixed start-up is the same on a cluster.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from capfleet.cluster.connect import cluster_cpus, ray_imported
from capfleet.core.artifacts import cpu_info
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import is_uri, place, read_parquet
from capfleet.jobs.caption.caption_config import PLAN_CPUS, CaptionConfig
from capfleet.jobs.caption.job import duration, run_caption_job
from capfleet.jobs.caption.listing import list_inputs

DEFAULT_SAMPLE = 4096  # images in the second calibration run; the first has a quarter of them
MIN_FIRST = 16  # images in the first run, at least


@dataclass(frozen=True)
class Calibration:
    """What the two calibration jobs measured."""

    images: tuple[int, int]  # n1, n2
    shard_size: int  # the calibration's shards (sample / CPUs, at most the spec's)
    wall_s: tuple[float, float]
    cpus: float  # the CPUs the calibration jobs ran on
    rate: float  # images/s on those CPUs, start-up excluded
    fixed_s: float  # what a job pays once
    stages_ms: dict  # per model: mean read, decode, encoder and decoder ms per image
    machine: dict
    # the rate with the wall difference moved by how much the first run's wall moved when run
    # again (inf: that much could explain the whole difference)
    rate_range: tuple[float, float]

    def wall(self, images: int, cpus: float, rate: float | None = None) -> float:
        return self.fixed_s + images / ((rate or self.rate) * cpus / self.cpus)

    def wall_range(self, images: int, cpus: float) -> tuple[float, float]:
        """The estimate at the fastest and the slowest rate of the range."""
        lo, hi = self.rate_range
        fastest = self.fixed_s if math.isinf(hi) else self.wall(images, cpus, hi)
        return fastest, self.wall(images, cpus, lo)


def calibrate(
    cfg: CaptionConfig, sample: int = DEFAULT_SAMPLE, log: Callable[[str], None] = print
) -> Calibration:
    """Run the spec's caption job on the first quarter of `sample` images and on `sample`, and
    measure. Both runs cut their images into shards of at most n1 / CPUs, so that the first run
    already gives every CPU a shard (a job of fewer shards than CPUs leaves CPUs idle). Too
    few images are refused before the first run."""
    if sample < 4 * MIN_FIRST:
        raise CapfleetError(f"--sample: at least {4 * MIN_FIRST} images, got {sample}")
    cpus = cluster_cpus(cfg.address)
    listed = list_inputs(cfg.input, cfg.split, cfg.shard_size, cfg.image_column).images
    n2 = min(sample, listed)
    n1 = n2 // 4
    if n1 < MIN_FIRST:
        raise CapfleetError(
            f"plan: {cfg.input} lists {listed} images; calibrating needs at least "
            f"{4 * MIN_FIRST} (two runs of the job, on the first quarter and on all of them)"
        )
    shard = min(cfg.shard_size, max(16, math.ceil(n1 / cpus)))
    cfg = replace(cfg, shard_size=shard)
    walls = []
    shared = ray_imported()  # the driver's imports, before anything is timed
    with _scratch(cfg) as tmp:
        if shared:  # a shared session: its first job starts what later ones reuse
            run_caption_job(replace(cfg, out=str(tmp / "warm-up"), limit=16), log=str)
        # the first size again last: how much a run's wall moves by itself gives the range
        for k, n in enumerate((n1, n2, n1)):
            log(f"plan: calibrating on {n} images" + (" again" if k == 2 else ""))
            wall, run_summary = _timed_run(cfg, tmp / f"run-{k}", n)
            walls.append(wall)
            if k == 1:
                summary = run_summary
    small = (walls[0] + walls[2]) / 2
    if walls[1] <= small:
        raise CapfleetError(
            f"calibration too short to measure ({n1} images took {walls[0]:.1f} and "
            f"{walls[2]:.1f} s, {n2} took {walls[1]:.1f} s): give a larger --sample"
        )
    diff, moved = walls[1] - small, abs(walls[0] - walls[2])
    rate = (n2 - n1) / diff
    rate_range = (
        (n2 - n1) / (diff + moved),
        (n2 - n1) / (diff - moved) if diff > moved else math.inf,
    )
    return Calibration(
        (n1, n2),
        shard,
        tuple(round(w, 3) for w in walls),
        cpus,
        rate,
        max(0.0, small - n1 / rate),
        _stages(summary),
        cpu_info(),
        rate_range,
    )


@contextmanager
def _scratch(cfg: CaptionConfig) -> Iterator[Path]:
    """A temporary folder for calibration runs beside the spec's output (on a cluster, storage
    every node writes to; for an output in an object store, a prefix beside it), removed after."""
    if is_uri(cfg.out):
        import secrets

        scratch = place(cfg.out).parent / f".capfleet-plan-{secrets.token_hex(6)}"
        try:
            yield scratch
        finally:
            for key in scratch.listing():
                (scratch / key).unlink(missing_ok=True)
        return
    parent = Path(cfg.out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".capfleet-plan-", dir=parent) as name:
        yield Path(name)


def _timed_run(cfg: CaptionConfig, out: Path, images: int) -> tuple[float, list[dict]]:
    """The spec's caption job on its first `images` images into `out`: its wall seconds and
    its summary rows."""
    t0 = time.perf_counter()
    run_caption_job(replace(cfg, out=str(out), limit=images), log=lambda _: None)
    wall = time.perf_counter() - t0
    return wall, read_parquet(out / "summary.parquet").to_pylist()


def _stages(summary: list[dict]) -> dict:
    """Per model: mean read, decode, encoder and decoder ms per image."""
    keys = ("read_ms", "decode_ms", "encoder_ms", "decoder_ms")
    return {s["model"]: {k: s.get(k) for k in keys} for s in summary}


def measure_job(cfg: CaptionConfig, sample: int = 1024, cpus: float = 0) -> Calibration:
    """One real caption job of the spec on its first `sample` images (into a folder beside its
    output, removed after), read as a calibration: the job's own throughput (images captioned
    per second from its first part begun to its last finished: start-up excluded) as the rate,
    what its wall took beyond that as the fixed part. A single job, for comparing bundles
    (the goal search's cost); `calibrate` separates the two by two runs, for a plan. `cpus`:
    the cluster's, when the caller has asked it already (0: asked here)."""
    cpus = cpus or cluster_cpus(cfg.address)
    with _scratch(cfg) as tmp:
        wall, summary = _timed_run(cfg, tmp / "run", sample)
    if len(summary) != 1 or not summary[0]["throughput_img_s"]:
        raise CapfleetError(f"{cfg.bundles}: the caption job captioned nothing to measure")
    rate, n = summary[0]["throughput_img_s"], summary[0]["ok"]
    return Calibration(
        (n,),
        cfg.shard_size,
        (round(wall, 2),),
        cpus,
        rate,
        max(0.0, wall - n / rate),
        _stages(summary),
        cpu_info(),
        (rate, rate),  # one job: no range
    )


def plan_table(
    cal: Calibration, images: int, cpus: Sequence[float] = PLAN_CPUS, price: float | None = None
) -> list[dict]:
    """One row per cluster size: estimated wall time, images/s and cost."""
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
        "| CPUs | wall | range | images/s | CPU-hours |" + (" cost |" if price is not None else ""),
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
    top = "no bound" if math.isinf(hi) else f"{hi:.1f}"
    if len(cal.images) == 1:  # measure_job
        measured = (
            f"Measured: one caption job of {cal.images[0]} images in {cal.wall_s[0]:.1f} s: "
            f"{cal.rate:.1f} images/s on {cal.cpus:g} CPUs (its own throughput, start-up "
            f"excluded) after a fixed {cal.fixed_s:.1f} s."
        )
    else:
        n1, n2 = cal.images
        measured = (
            f"Measured: {n1} images in {cal.wall_s[0]:.1f} s and again in "
            f"{cal.wall_s[2]:.1f} s, {n2} in {cal.wall_s[1]:.1f} s (shards of "
            f"{cal.shard_size}): {cal.rate:.1f} images/s on {cal.cpus:g} CPUs ({lo:.1f} to "
            f"{top}: the difference moved by as much as the {n1}-image run's wall moved when "
            f"repeated) after a fixed {cal.fixed_s:.1f} s (Ray's start, loading the models, "
            "the summary and gallery)."
        )
    lines += [
        "",
        measured,
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
            "images_per_s": round(cal.rate, 2),
            "images_per_s_range": [
                round(cal.rate_range[0], 2),
                None if math.isinf(cal.rate_range[1]) else round(cal.rate_range[1], 2),
            ],
            "fixed_s": round(cal.fixed_s, 2),
            "stages_ms": cal.stages_ms,
            "machine": cal.machine,
        },
        "plan": rows,
    }
    return json.dumps(doc, indent=1) + "\n"
