"""The caption job on Ray Data: shards -> fetch + decode -> one actor pool per bundle (each
actor writes its shard's Parquet part) -> shard ids back to the driver for progress.

Sizing: with no `actors`, each bundle's pool autoscales up to what the cluster's CPUs allow
(its share of them when there are several bundles). With `decode_cpus` equal to `actor_cpus`
(the default) Ray Data fuses fetching and decoding into the first pool's actors, so each actor
is one process per CPU that reads, decodes and captions its own shards; nothing else in the
pipeline needs a CPU (the driver lists the shards, the actors write the parts), which keeps a
pool that takes every CPU from starving other stages (docs/stack.md).
With an address, OUT must be a filesystem that the driver and every worker see.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from capfleet.cluster.caption_config import CaptionConfig
from capfleet.cluster.connect import ray_session
from capfleet.model.artifacts import package_versions, write_json_atomic, write_parquet_atomic
from capfleet.model.bulk.decode import decode_batch
from capfleet.model.bulk.reader import Listing, list_inputs, with_references
from capfleet.model.bulk.summary import summarize
from capfleet.model.bulk.worker import CaptionWorker
from capfleet.model.bulk.writer import bundle_identity, check_plan, part_done, part_path
from capfleet.model.bundle import read_manifest
from capfleet.model.data import open_reader
from capfleet.model.errors import CapfleetError

LOG_FILE = "capfleet.log"  # Ray's own messages, and the job's progress, in OUT
PROGRESS_EVERY_S = 5.0


def run_caption_job(
    cfg: CaptionConfig, log: Callable[[str], None] = print, verbose: bool = False
) -> dict:
    """Caption every input image with every bundle into cfg.out; returns job.json's content."""
    started = datetime.now(timezone.utc)
    t0, run_started = time.perf_counter(), time.time()
    manifests = [read_manifest(b) for b in cfg.bundles]  # refuse a bad bundle before any work
    if not cfg.names:  # the spec was loaded before its bundles existed
        cfg = replace(cfg, names=())
    sizes = sorted({int(m["encoder"]["input_size"]) for m in manifests})
    listing = _listing(cfg, log)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CapfleetError(f"{out}: cannot create the output folder ({e.strerror or e})") from e
    check_plan(
        out,
        {
            "shard_size": cfg.shard_size,
            "images": listing.images,
            "inputs_sha256": listing.identity(),
            "beam_width": cfg.beam_width,
            "bundles": {n: bundle_identity(m) for n, m in zip(cfg.names, manifests, strict=True)},
        },
    )
    shards = listing.shards
    pending = [
        s for s in shards if any(not part_done(part_path(out, m, s.shard)) for m in cfg.names)
    ]
    log(
        f"caption: {listing.images} images ({listing.kind}) in {len(shards)} shards x "
        f"{len(cfg.names)} models; {len(shards) - len(pending)} shards already done"
    )

    ray_start = 0.0
    if pending:
        with _ray_logs_to(out / LOG_FILE, verbose):
            t_ray = time.perf_counter()
            with ray_session(cfg.address or None) as ray:
                ray_start = time.perf_counter() - t_ray
                _run_pipeline(ray, cfg, pending, sizes, out, log, verbose)

    bundles = dict(zip(cfg.names, cfg.bundles, strict=True))
    t_summary = time.perf_counter()
    summary = summarize(out, bundles, run_started)
    write_parquet_atomic(out / "summary.parquet", summary)
    summary_s = time.perf_counter() - t_summary
    wall = time.perf_counter() - t0
    counts = dict(zip(summary["model"].to_pylist(), summary["images"].to_pylist(), strict=True))
    job = {
        "kind": "caption",
        "spec": asdict(cfg),
        "versions": package_versions("capfleet", "ray", "ai-edge-litert", "pyarrow"),
        "start": started.isoformat(timespec="seconds"),
        "end": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 2),
        "ray_start_seconds": round(ray_start, 2),  # starting or joining Ray, within the wall
        "summary_seconds": round(summary_s, 2),
        "images": listing.images,
        "rows": counts,
        "shards": {"total": len(shards), "run": len(pending)},
    }
    write_json_atomic(out / "job.json", job)
    _print_summary(summary, log)
    return job


def _listing(cfg: CaptionConfig, log) -> Listing:
    listing = list_inputs(cfg.input, cfg.split, cfg.shard_size, cfg.image_column)
    if not listing.images:
        raise CapfleetError(f"{cfg.input}: no images to caption")
    if cfg.references:
        refs = open_reader(cfg.references, cfg.split or None).records()
        by_id = {r.image_id: r.captions for r in refs}
        matched = sum(i in by_id for s in listing.shards for i in s.image_id)
        log(f"caption: {matched} of {listing.images} images have references in {cfg.references}")
        listing = with_references(listing, by_id)
    return listing


def pool_size(ray, cfg: CaptionConfig) -> tuple[int, int]:
    """(min, max) actors of each bundle's pool: `actors` pins it; otherwise it grows to the
    cluster's CPUs divided among the bundles, at least one actor each."""
    if cfg.actors:
        return cfg.actors, cfg.actors
    cpus = float(ray.cluster_resources().get("CPU", 1))
    most = max(1, int(cpus // (cfg.actor_cpus * len(cfg.bundles))))
    return 1, most


def _run_pipeline(ray, cfg: CaptionConfig, pending, sizes, out: Path, log, verbose: bool) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose  # the driver prints one progress line instead
    ctx.print_on_execution_start = verbose
    items = [s.item() for s in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"sizes": sizes, "max_bytes": int(cfg.max_image_mb * 2**20)},
        batch_size=1,
        batch_format="numpy",
        num_cpus=cfg.decode_cpus,
    )
    low, high = pool_size(ray, cfg)
    threads = max(1, int(cfg.actor_cpus))
    for k, (bundle, name) in enumerate(zip(cfg.bundles, cfg.names, strict=True)):
        ds = ds.map_batches(
            CaptionWorker,
            fn_constructor_kwargs={
                "bundle_dir": str(Path(bundle).resolve()),
                "name": name,
                "out": str(out.resolve()),
                "batch_size": cfg.batch_size,
                "num_threads": threads,
                "beam_width": cfg.beam_width,
                "keep_images": k < len(cfg.bundles) - 1,
            },
            batch_size=1,
            batch_format="numpy",
            num_cpus=cfg.actor_cpus,
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
            # Ray Data restarts a dead actor and retries its shard by default; a retried shard
            # rewrites the same part file atomically, so nothing is written twice.
        )
    total = sum(len(s) for s in pending)
    progress = Progress(total, log)
    pool = f"{low}" if low == high else f"1 to {high}"
    log(
        f"caption: {len(pending)} shards to do; {pool} actor(s) of {cfg.actor_cpus:g} CPU per model"
    )
    for row in ds.iter_rows():
        progress.add(int(row["rows"]))
    progress.done()


class Progress:
    """One progress line every few seconds: images done, images/s, time left."""

    def __init__(self, total: int, log, every_s: float = PROGRESS_EVERY_S):
        self.total, self.log, self.every_s = total, log, every_s
        self.done_images, self.start = 0, time.perf_counter()
        self.last = self.start

    def add(self, images: int) -> None:
        self.done_images += images
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.log(self.line(now))

    def line(self, now: float) -> str:
        rate = self.done_images / max(now - self.start, 1e-9)
        left = (self.total - self.done_images) / rate if rate else float("inf")
        eta = _duration(left) if left != float("inf") else "?"
        share = self.done_images / self.total if self.total else 1.0
        return (
            f"caption: {self.done_images:,}/{self.total:,} images ({share:.0%}), "
            f"{rate:,.0f} img/s, {eta} left"
        )

    def done(self) -> None:
        self.log(self.line(time.perf_counter()).replace(", 0 s left", ""))


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


@contextlib.contextmanager
def _ray_logs_to(path: Path, verbose: bool):
    """Ray's own messages (start-up notices, operator dumps, warnings about actor arguments,
    deprecations; some written by its C++ core straight to the process's stderr) go to
    OUT/capfleet.log instead of the console; with `verbose` they stay on the console. The job's
    own progress goes through `log` (stdout) either way."""
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # recorded in the log file, not hidden
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _print_summary(summary, log) -> None:
    cols = [
        "model",
        "images",
        "ok",
        "failed",
        "throughput_img_s",
        "latency_p50_ms",
        "size_mb",
        "bleu1",
        "bleu4",
    ]
    rows = summary.select(cols).to_pylist()
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    table = [cols] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    for r in table:
        log("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
