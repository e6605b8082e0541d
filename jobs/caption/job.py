"""The caption job on Ray Data: shards -> fetch + decode -> one actor pool, each actor hosting
every bundle (it captions a shard with each model in turn and writes each model's Parquet part)
-> shard ids back to the driver for progress.

Sizing: with no `actors`, the pool autoscales up to what the cluster's CPUs allow. One pool of
actors holding every model keeps each CPU busy whatever the models' relative speeds (a pool per
model left a fast int8 model's actors waiting on a slow fp32 one's: 57% of the CPUs busy
captioning a test split with both) and decodes each shard once; an actor's memory is the sum of
its models'. With `decode_cpus` equal to `actor_cpus` (the default) the actors fetch and decode
their shards themselves, so each actor is one process per CPU that reads, decodes and captions
its own shards; nothing else in the pipeline needs a CPU (the driver lists the shards, the
actors write the parts), which keeps a pool that takes every CPU from starving other stages
(docs/stack.md).
With an address, OUT must be a filesystem that the driver and every worker see.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from capfleet.cluster.connect import ray_messages_to, ray_session
from capfleet.cluster.watchdog import (
    TIMEOUT,
    WORKER_DIED,
    WORKER_ERROR,
    clear_note,
    read_note,
)
from capfleet.core.artifacts import (
    OutputLock,
    package_versions,
    remove_leftovers,
    write_json_atomic,
    write_parquet_atomic,
)
from capfleet.core.errors import CapfleetError
from capfleet.jobs.caption.caption_config import CaptionConfig
from capfleet.jobs.caption.listing import (
    Listing,
    Shard,
    first_images,
    list_inputs,
    recut,
    with_references,
)
from capfleet.jobs.caption.load import decode_batch
from capfleet.jobs.caption.parts import (
    OK,
    bundle_identity,
    check_plan,
    failed_part,
    part_done,
    part_path,
    part_stats,
    write_part,
)
from capfleet.jobs.caption.report import gallery_sample, write_reports
from capfleet.jobs.caption.summary import summarize
from capfleet.jobs.caption.worker import CaptionWorker
from capfleet.model.bundle import check_bundle
from capfleet.model.data import open_reader

LOG_FILE = "capfleet.log"  # Ray's own messages go here, not to the console
PROGRESS_EVERY_S = 5.0
WAIT_FOR_ACTORS_S = 600  # Ray Data gives up on placing a pool's first actors after this
SMALL_INPUT_SHARDS, MIN_SHARD = 16, 64  # how a small input is cut (see _listing)


def run_caption_job(
    cfg: CaptionConfig,
    log: Callable[[str], None] = print,
    verbose: bool = False,
    retry_errors: bool = False,
) -> dict:
    """Caption every input image with every bundle into cfg.out; returns job.json's content.
    With `retry_errors`, rows whose status is error are captioned again and replaced in their
    parts (ok rows untouched) besides the shards still missing."""
    started = datetime.now(timezone.utc)
    t0, run_started = time.perf_counter(), time.time()
    manifests = [check_bundle(b) for b in cfg.bundles]  # refuse a bad bundle before any work
    if not cfg.names:  # the spec was loaded before its bundles existed
        cfg = replace(cfg, names=())
    sizes = sorted({int(m["encoder"]["input_size"]) for m in manifests})
    listing = _listing(cfg, log)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CapfleetError(f"{out}: cannot create the output folder ({e.strerror or e})") from e
    with OutputLock(out, "caption job", log):
        left = remove_leftovers(out)
        if left:
            log(f"caption: removed {left} temporary files left by a killed job")
        check_plan(
            out,
            {
                "shard_size": cfg.shard_size,
                "images": listing.images,
                "inputs_sha256": listing.identity(),
                "beam_width": cfg.beam_width,
                "bundles": {
                    n: bundle_identity(m) for n, m in zip(cfg.names, manifests, strict=True)
                },
            },
        )
        shards = listing.shards
        todo = _todo(out, cfg.names, shards, retry_errors)
        log(
            f"caption: {listing.images} images ({listing.kind}) in {len(shards)} shards x "
            f"{len(cfg.names)} models; {len(shards) - len(todo)} shards already done"
            + (
                f", {sum(s.rows is not None for s in todo)} with error rows to redo"
                if retry_errors
                else ""
            )
        )
        failed: dict[int, str] = {}
        ray_start = 0.0
        if todo:
            with ray_messages_to(out / LOG_FILE, verbose):
                t_ray = time.perf_counter()
                with ray_session(cfg.address or None) as ray:
                    ray_start = time.perf_counter() - t_ray
                    failed = _run_pipeline(ray, cfg, todo, sizes, out, log, verbose, retry_errors)
        for shard in todo:
            if shard.shard in failed:
                _record_failure(out, cfg.names, shard, listing, failed[shard.shard])
        t_summary = time.perf_counter()
        bundles = dict(zip(cfg.names, cfg.bundles, strict=True))
        sample = gallery_sample(listing, cfg.gallery)
        summary, extras = summarize(out, bundles, run_started, set(sample))
        write_parquet_atomic(out / "summary.parquet", summary)
        summary_s = time.perf_counter() - t_summary
        reports = write_reports(out, listing, list(cfg.names), sample, extras)
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
            "shards": {"total": len(shards), "run": len(todo), "failed": len(failed)},
            "retry_errors": retry_errors,
            "reports": [str(r) for r in reports],
        }
        write_json_atomic(out / "job.json", job)
    _print_summary(summary, log)
    if failed:
        reasons = sorted({why.split(":", 1)[0] for why in failed.values()})
        log(
            f"caption: {len(failed)} shards failed ({', '.join(reasons)}); their rows are error "
            "rows. Rerun the same command to retry them."
        )
    return job


def _todo(out: Path, names, shards: list[Shard], retry_errors: bool) -> list[Shard]:
    """The shards to run: those with a model's part missing (whole); with `retry_errors` also
    those whose parts hold error rows (only those rows)."""
    todo = []
    for s in shards:
        stats = [part_stats(part_path(out, m, s.shard)) for m in names]
        if any(st is None or st.retry for st in stats):
            todo.append(s)
        elif retry_errors and any(st.errors for st in stats):
            bad: set[int] = set()
            for m, st in zip(names, stats, strict=True):
                if st.errors:
                    status = pq.read_table(part_path(out, m, s.shard), columns=["status"])
                    bad |= {i for i, v in enumerate(status.column(0).to_pylist()) if v != OK}
            todo.append(s.subset(sorted(bad)))
    return todo


def _record_failure(out: Path, names, shard: Shard, listing: Listing, why: str) -> None:
    """A shard whose worker kept failing: error rows (with the reason) in every model's part
    that is not done, so the outputs account for each of its images; a rerun redoes them."""
    whole = listing.shards[shard.shard]
    for m in names:
        path = part_path(out, m, shard.shard)
        if not part_done(path):
            write_part(path, *failed_part(whole, m, why))
    clear_note(out, shard.shard)


def _listing(cfg: CaptionConfig, log) -> Listing:
    """The input cut into shards of `shard_size` images at most; a small input into smaller
    ones, at least SMALL_INPUT_SHARDS of at least MIN_SHARD images, so that it still keeps
    several CPUs busy (1,000 test images in one shard had one actor caption them all while
    the others idled). Cut from the input's size alone: a rerun cuts the same shards."""

    def limited(listing: Listing) -> Listing:
        return first_images(listing, cfg.limit) if cfg.limit else listing

    whole = list_inputs(cfg.input, cfg.split, cfg.shard_size, cfg.image_column)
    listing = limited(whole)
    if not listing.images:
        raise CapfleetError(f"{cfg.input}: no images to caption")
    small = max(MIN_SHARD, math.ceil(listing.images / SMALL_INPUT_SHARDS))
    if small < cfg.shard_size:  # cut again from what was listed, not listed again
        listing = limited(recut(whole, small))
    if cfg.references:
        refs = open_reader(cfg.references, cfg.split or None).records()
        by_id = {r.image_id: r.captions for r in refs}
        matched = sum(i in by_id for s in listing.shards for i in s.image_id)
        log(f"caption: {matched} of {listing.images} images have references in {cfg.references}")
        listing = with_references(listing, by_id)
    return listing


def pool_size(ray, cfg: CaptionConfig) -> tuple[int, int]:
    """(min, max) actors of the pool (each hosts every bundle): `actors` pins it; otherwise it
    grows to the cluster's CPUs, at least one actor. An actor larger than every node could
    never be placed: refused here rather than waited for."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    largest = max((n.get("Resources", {}).get("CPU", 0) for n in nodes), default=0)
    for key in ("actor_cpus", "decode_cpus"):
        if getattr(cfg, key) > largest:
            raise CapfleetError(
                f"{key}: {getattr(cfg, key):g} CPUs, but the largest node has {largest:g}: "
                "no actor could ever start"
            )
    if cfg.actors:
        return cfg.actors, cfg.actors
    cpus = float(ray.cluster_resources().get("CPU", 1))
    most = max(1, int(cpus // cfg.actor_cpus))
    return 1, most


def _run_pipeline(
    ray, cfg: CaptionConfig, todo, sizes, out: Path, log, verbose: bool, repair: bool
) -> dict[int, str]:
    """Run the shards; returns {shard: why} for those whose worker failed after its retries."""
    low, high = pool_size(ray, cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose  # the driver prints one progress line instead
    ctx.print_on_execution_start = verbose
    # a shard that fails after its retries is dropped by Ray Data, not the whole job; the
    # driver then writes its rows as errors (below)
    ctx.max_errored_blocks = -1
    ctx.wait_for_min_actors_s = WAIT_FOR_ACTORS_S
    for s in todo:
        clear_note(out, s.shard)
    items = [s.item() for s in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    decode = {"sizes": sizes, "max_bytes": int(cfg.max_image_mb * 2**20)}
    fused = cfg.decode_cpus == cfg.actor_cpus
    if not fused:  # decoding as tasks of their own, retried the same number of times
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={**decode, "out": str(out.resolve()), "timeout_s": cfg.shard_timeout_s},
            batch_size=1,
            batch_format="numpy",
            num_cpus=cfg.decode_cpus,
            max_retries=cfg.max_retries,
        )
    ds = ds.map_batches(
        CaptionWorker,
        fn_constructor_kwargs={
            # every actor hosts every bundle and captions each shard with each in turn
            "bundles": {
                name: str(Path(bundle).resolve())
                for bundle, name in zip(cfg.bundles, cfg.names, strict=True)
            },
            "out": str(out.resolve()),
            "batch_size": cfg.batch_size,
            "num_threads": max(1, int(cfg.actor_cpus)),
            "beam_width": cfg.beam_width,
            "shard_timeout_s": cfg.shard_timeout_s,
            "repair": repair,
            "decode": decode if fused else None,  # the actors fetch and decode (the default)
            "tries": 1 + cfg.max_retries,
        },
        batch_size=1,
        batch_format="numpy",
        num_cpus=cfg.actor_cpus,
        # starts as large as the cluster allows; may shrink when idle (the job's tail).
        # Two shards in flight per actor: the next one is queued while it runs the first,
        # so it never waits on the driver between shards (one in flight cost 10%)
        compute=ray.data.ActorPoolStrategy(
            min_size=low, max_size=high, initial_size=high, max_tasks_in_flight_per_actor=2
        ),
        # a dead actor is always restarted (a pool with none would wait forever) and Ray
        # retries the shards queued on it; the worker counts each shard's starts and passes
        # it by after 1 + max_retries, so one that kills every worker it lands on (out of
        # memory, a native crash) cannot loop, and a shard queued behind it loses no try
        max_restarts=-1,
        max_task_retries=-1,
    )
    total = sum(len(s) for s in todo)
    progress = Progress(total, log)
    pool = f"{low}" if low == high else f"1 to {high}"
    models = "the model" if len(cfg.bundles) == 1 else f"all {len(cfg.bundles)} models"
    log(f"caption: {len(todo)} shards; {pool} actor(s) of {cfg.actor_cpus:g} CPU with {models}")
    done: set[int] = set()
    for row in ds.iter_rows():
        done.add(int(row["shard"]))
        progress.add(int(row["rows"]))
    progress.done()
    failed = {}
    for s in todo:
        if s.shard not in done:
            note = read_note(out, s.shard) or {}
            if note.get("reason") == TIMEOUT:
                why = f"{TIMEOUT}: {note.get('stage')} ran over {note.get('seconds')} s"
            elif note.get("reason") == WORKER_ERROR:  # a bug: the log file has the traceback
                why = f"{WORKER_ERROR}: {note.get('detail')} (a bug: see {LOG_FILE})"
            else:
                why = f"{WORKER_DIED}: its worker died on each of {1 + cfg.max_retries} attempts"
            failed[s.shard] = why
    return failed


class Progress:
    """One progress line every few seconds: images done, images/s, time left."""

    def __init__(self, total: int, log, every_s: float = PROGRESS_EVERY_S):
        self.total, self.log, self.every_s = total, log, every_s
        self.done_images, self.start = 0, time.perf_counter()
        self.last, self.shown = self.start, -1

    def add(self, images: int) -> None:
        self.done_images += images
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._show(now)

    def _show(self, now: float) -> None:
        rate = self.done_images / max(now - self.start, 1e-9)
        left = (self.total - self.done_images) / rate if rate else float("inf")
        share = self.done_images / self.total if self.total else 1.0
        line = (
            f"caption: {self.done_images:,}/{self.total:,} images ({share:.0%}), {rate:,.0f} img/s"
        )
        if self.done_images < self.total:
            line += f", {_duration(left) if left != float('inf') else '?'} left"
        self.log(line)
        self.shown = self.done_images

    def done(self) -> None:
        if self.shown != self.done_images:
            self._show(time.perf_counter())


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


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
