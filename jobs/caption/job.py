"""The caption job's steps: list the inputs into shards, check the plan (resume), run the shards
on the executor's pool (cluster/pool.py), each actor hosting every bundle (it loads a shard,
captions it with each model in turn and writes each model's Parquet part), record the shards
that failed as error rows, then the summary, the reports and job.json.

Sizing: with no `actors`, the pool autoscales up to what the cluster's CPUs allow. One pool of
actors holding every model keeps each CPU busy whatever the models' relative speeds (a pool per
model leaves a fast int8 model's actors waiting on a slow fp32 one's) and decodes each shard
once; an actor's memory is the sum of its models'. With `decode_cpus` equal to `actor_cpus`
(the default) the actors fetch and decode their shards themselves, so each actor is one process
per CPU that reads, decodes and captions its own shards; nothing else in the job needs a CPU
(the driver lists the shards, the actors write the parts), which keeps a pool that takes every
CPU from starving other stages (docs/stack.md).
OUT may be a local folder or a filesystem URI (s3://...): the workers write the parts there
themselves. With a cluster whose nodes share no disk, OUT must be an object store (or a shared
file system): after the shards ran, every (shard, model) must have a part the driver can read,
or the job fails naming that cause rather than summarising what it happens to see.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from capfleet.cluster.connect import ray_messages_to, ray_session
from capfleet.cluster.pool import Pool, pool_size, run_units
from capfleet.cluster.shipping import ship
from capfleet.cluster.watchdog import WORKER_ERROR, clear_note
from capfleet.core.artifacts import (
    write_parquet_atomic,
)
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import is_uri, local, read_parquet
from capfleet.jobs.caption.caption_config import (
    CaptionConfig,
    bundle_names,
    expand_bundles,
    url_policy,
)
from capfleet.jobs.caption.listing import (
    Listing,
    Shard,
    first_images,
    list_inputs,
    recut,
    with_references,
)
from capfleet.jobs.caption.load import THUMBS_DIR, load_shard
from capfleet.jobs.caption.parts import (
    OK,
    bundle_identity,
    check_plan,
    failed_part,
    part_done,
    part_path,
    part_stats,
    parts,
    upgrade_layout,
    write_part,
)
from capfleet.jobs.caption.report import gallery_sample, write_reports
from capfleet.jobs.caption.summary import summarize
from capfleet.jobs.caption.worker import CaptionWorker
from capfleet.jobs.skeleton import LOG_FILE, JobRun
from capfleet.model.bundle import MANIFEST_FILE, REQUIRED_FILES, check_bundle, manifest_sha
from capfleet.model.data import open_reader

PROGRESS_EVERY_S = 5.0
CAPTION_VERSIONS = ("capfleet", "ray", "ai-edge-litert", "pyarrow")  # recorded in job.json
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
    run = JobRun("caption", cfg.out, {}, log, CAPTION_VERSIONS, steps=("ray_start", "summary"))
    run_started = time.time()
    bundles = expand_bundles(cfg.bundles)  # patterns that matched nothing when it was loaded
    if bundles != cfg.bundles:
        cfg = replace(cfg, bundles=bundles, names=())
    manifests = [check_bundle(b) for b in cfg.bundles]  # refuse a bad bundle before any work
    if not cfg.names:  # the spec was loaded before its bundles existed, or they are in a store
        cfg = replace(cfg, names=bundle_names(cfg.bundles, manifests))
    run.spec = asdict(cfg)
    sizes = sorted({int(m["encoder"]["input_size"]) for m in manifests})
    listing = _listing(cfg, log)
    out = local(cfg.out)
    with run:
        upgrade_layout(out)
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
        sample = gallery_sample(listing, cfg.gallery)
        if todo:
            with ray_messages_to(out / LOG_FILE, verbose):
                t_ray = time.perf_counter()
                with ray_session(cfg.address or None):  # starting or joining Ray, within the wall
                    run.seconds["ray_start"] = time.perf_counter() - t_ray
                    failed = _run_shards(cfg, todo, sizes, out, sample, log, retry_errors)
        for shard in todo:
            if shard.shard in failed:
                _record_failure(out, cfg.names, shard, listing, failed[shard.shard])
        with run.step("summary"):
            bundles = dict(zip(cfg.names, cfg.bundles, strict=True))
            summary, extras = summarize(out, bundles, run_started, set(sample))
            write_parquet_atomic(out / "summary.parquet", summary)
        reports = write_reports(out, listing, list(cfg.names), sample, extras, url_policy(cfg))
        counts = dict(zip(summary["model"].to_pylist(), summary["images"].to_pylist(), strict=True))
        job = run.finish(
            images=listing.images,
            rows=counts,
            shards={"total": len(shards), "run": len(todo), "failed": len(failed)},
            retry_errors=retry_errors,
            reports=[str(r) for r in reports],
        )
    _print_summary(summary, log)
    if failed:
        reasons = sorted({why.split(":", 1)[0] for why in failed.values()})
        log(
            f"caption: {len(failed)} shards failed ({', '.join(reasons)}); their rows are error "
            "rows. Rerun the same command to retry them."
        )
    return job


def _bundle_source(bundle: str, cluster: bool) -> dict:
    """How a worker finds a bundle (model.bundle.bundle_here): its path or URI and content;
    a local bundle on a cluster is also shipped through Ray's object store, for the nodes that
    do not share the driver's disk (a node that does loads it where it is)."""
    where = local(bundle)
    shipped = None
    if cluster and not is_uri(bundle):
        shipped = ship(where, [MANIFEST_FILE, *REQUIRED_FILES])
    return {"path": str(where), "sha": manifest_sha(where), "shipped": shipped}


def _written(out, names) -> set[tuple[str, int]]:
    """(model, shard) of every part file present, from one listing per model."""
    found = set()
    for m in names:
        for p in parts(out, m):
            found.add((m, int(p.stem.removeprefix("part-"))))
    return found


def _check_parts_seen(out, names, shards: list[int]) -> None:
    """Every shard a worker reported done must have a part the driver reads, for every model:
    parts written where the driver cannot see them (a local OUT on nodes that share no disk)
    would otherwise leave a short summary and a job that seems to have succeeded."""
    seen = _written(out, names)  # one listing per model: the footers summarize reads
    missing = [(m, s) for s in shards for m in names if (m, s) not in seen]
    if not missing:
        return
    m, s = missing[0]
    if is_uri(out):
        raise CapfleetError(
            f"{out}: {len(missing)} part(s) that workers reported written are not in the store "
            f"(first: {part_path(out, m, s)}); rerun the same command to redo them"
        )
    raise CapfleetError(
        f"{out}: {len(missing)} part(s) that workers reported written are not here (first: "
        f"{part_path(out, m, s)}): the output folder is not shared by every node of the "
        "cluster; write to an object store (--out s3://bucket/prefix) or a file system every "
        "node mounts"
    )


def _todo(out: Path, names, shards: list[Shard], retry_errors: bool) -> list[Shard]:
    """The shards to run: those with a model's part missing (whole); with `retry_errors` also
    those whose parts hold error rows (only those rows). The parts present are listed once,
    so a missing one costs no request to an object store."""
    todo = []
    seen = _written(out, names)
    for s in shards:
        stats = [
            part_stats(part_path(out, m, s.shard)) if (m, s.shard) in seen else None for m in names
        ]
        if any(st is None or st.retry for st in stats):
            todo.append(s)
        elif retry_errors and any(st.errors for st in stats):
            bad: set[int] = set()
            for m, st in zip(names, stats, strict=True):
                if st.errors:
                    status = read_parquet(part_path(out, m, s.shard), columns=["status"])
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

    # the job's own outputs (latency.png...) are no input, should OUT lie inside a folder input
    whole = list_inputs(
        cfg.input, cfg.split, cfg.shard_size, cfg.image_column, cfg.out, cfg.caption_column
    )
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


def _run_shards(
    cfg: CaptionConfig, todo, sizes, out: Path, sample: list[str], log, repair: bool
) -> dict[int, str]:
    """Run the shards on the pool; returns {shard: why} for those whose worker failed after
    its tries."""
    decode = {
        "sizes": sizes,
        "max_bytes": int(cfg.max_image_mb * 2**20),
        "policy": url_policy(cfg),
        # the gallery's sample keeps thumbnails as it is read: the page fetches nothing again
        "thumbs": {"dir": str((out / THUMBS_DIR).resolve()), "ids": frozenset(sample)},
    }
    fused = cfg.decode_cpus == cfg.actor_cpus  # the actors fetch and decode (the default)
    pool = Pool(
        worker=CaptionWorker,
        kwargs={
            # every actor hosts every bundle and captions each shard with each in turn
            "bundles": {
                name: _bundle_source(bundle, bool(cfg.address))
                for bundle, name in zip(cfg.bundles, cfg.names, strict=True)
            },
            "out": str(out.resolve()),
            "batch_size": cfg.batch_size,
            "num_threads": max(1, int(cfg.actor_cpus)),
            "beam_width": cfg.beam_width,
            "shard_timeout_s": cfg.shard_timeout_s,
            "repair": repair,
            "decode": decode if fused else None,
        },
        notes=str(out.resolve()),
        cpus=cfg.actor_cpus,
        actors=cfg.actors,
        tries=1 + cfg.max_retries,
        overlap=fused,  # the next shard's bytes fetched while one is captioned
        # otherwise decoding runs as tasks of their own, tried as often
        prepare=None if fused else load_shard,
        prepare_kwargs={**decode, "out": str(out.resolve()), "timeout_s": cfg.shard_timeout_s},
        prepare_cpus=cfg.decode_cpus,
    )
    units = [{"unit": s.shard, **s.item()} for s in todo]
    total = sum(len(s) for s in todo)
    progress = Progress(total, log)
    size = pool_size(pool, len(units))
    models = "the model" if len(cfg.bundles) == 1 else f"all {len(cfg.bundles)} models"
    log(f"caption: {len(todo)} shards; {size} actor(s) of {cfg.actor_cpus:g} CPU with {models}")
    failed = run_units(
        units, pool, lambda r: progress.add(int(r["rows"])), lambda m: log(f"caption: {m}")
    )
    progress.done()
    _check_parts_seen(out, cfg.names, [s.shard for s in todo if s.shard not in failed])
    return {
        shard: why + (f" (a bug: see {LOG_FILE})" if why.startswith(WORKER_ERROR) else "")
        for shard, why in failed.items()
    }


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
            f"caption: {self.done_images:,}/{self.total:,} images ({share:.0%}), "
            f"{rate:,.0f} img/s with start-up"
        )
        if self.done_images < self.total:
            line += f", {duration(left) if left != float('inf') else '?'} left"
        self.log(line)
        self.shown = self.done_images

    def done(self) -> None:
        if self.shown != self.done_images:
            self._show(time.perf_counter())


def duration(seconds: float) -> str:
    """A time span as a person reads it: seconds, minutes or hours."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


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
    log(
        "throughput_img_s: images captioned per second from the model's first part begun to its "
        "last finished (start-up excluded); latency_p50_ms: model ms per image, median of its calls"
    )
