"""The caption job on Ray Data: shards -> read + decode -> one actor pool per bundle (each
actor writes its shard's Parquet part) -> shard ids back to the driver for progress.

Sizing: on a small machine an actor pool that takes every CPU starves the other stages and the
job stalls (docs/stack.md), so actors take a fraction of a CPU each (`actor_cpus`). With
`decode_cpus` equal to it (the default) Ray Data fuses decoding into the first pool's actors.
With an address, OUT must be a filesystem that the driver and every worker see.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from capfleet.cluster.caption_config import CaptionConfig
from capfleet.cluster.connect import ray_session
from capfleet.model.artifacts import package_versions, write_json_atomic, write_parquet_atomic
from capfleet.model.bulk.decode import decode_batch
from capfleet.model.bulk.reader import shard_records
from capfleet.model.bulk.summary import summarize
from capfleet.model.bulk.worker import CaptionWorker
from capfleet.model.bulk.writer import check_plan, missing_models
from capfleet.model.bundle import read_manifest
from capfleet.model.data import ImageRecord, open_reader
from capfleet.model.errors import CapfleetError


def _absolute(r: ImageRecord) -> ImageRecord:
    """Local paths made absolute here, in the driver: workers may run elsewhere."""
    return r if "://" in r.uri else replace(r, uri=os.path.abspath(r.uri))


def run_caption_job(cfg: CaptionConfig, log: Callable[[str], None] = print) -> dict:
    """Caption every input image with every bundle into cfg.out; returns job.json's content."""
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    manifests = [read_manifest(b) for b in cfg.bundles]  # refuse a bad bundle before any work
    if not cfg.names:  # the spec was loaded before its bundles existed
        cfg = replace(cfg, names=())
    sizes = sorted({int(m["encoder"]["input_size"]) for m in manifests})
    records = [_absolute(r) for r in open_reader(cfg.input, cfg.split or None).records()]
    if not records:
        raise CapfleetError(f"{cfg.input}: no images to caption")
    if cfg.references:
        by_id = {
            r.image_id: r.captions for r in open_reader(cfg.references, cfg.split or None).records()
        }
        matched = sum(r.image_id in by_id for r in records)
        log(f"caption: {matched} of {len(records)} images have references in {cfg.references}")
        records = [replace(r, captions=by_id.get(r.image_id, r.captions)) for r in records]
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CapfleetError(f"{out}: cannot create the output folder ({e.strerror or e})") from e
    check_plan(
        out,
        cfg.shard_size,
        records,
        {
            n: m["files"]["encoder.tflite"]["sha256"] + m["files"]["decoder_step.tflite"]["sha256"]
            for n, m in zip(cfg.names, manifests, strict=True)
        },
    )
    shards = shard_records(records, cfg.shard_size)
    pending = [i for i in range(len(shards)) if missing_models(out, cfg.names, i)]
    log(
        f"caption: {len(records)} images in {len(shards)} shards x {len(cfg.names)} models; "
        f"{len(shards) - len(pending)} shards already done"
    )

    ray_start = 0.0
    if pending:
        t_ray = time.perf_counter()
        with ray_session(cfg.address or None) as ray:
            ray_start = time.perf_counter() - t_ray  # starting or joining Ray
            items = [
                {
                    "shard": i,
                    "image_id": [r.image_id for r in shards[i]],
                    "uri": [r.uri for r in shards[i]],
                }
                for i in pending
            ]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map_batches(
                decode_batch,
                fn_kwargs={"sizes": sizes},
                batch_size=1,
                batch_format="numpy",
                num_cpus=cfg.decode_cpus,
            )
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
                    concurrency=cfg.actors,
                    # Ray Data restarts a dead actor and retries its shard by default
                    # (max_restarts=-1, max_task_retries=-1); a retried shard rewrites the
                    # same part file atomically, so nothing is written twice.
                )
            for n, row in enumerate(ds.iter_rows(), 1):
                log(f"caption: shard {int(row['shard'])} done ({n}/{len(pending)})")

    wall = time.perf_counter() - t0
    bundles = dict(zip(cfg.names, cfg.bundles, strict=True))
    summary = summarize(out, bundles, records, wall, sum(len(shards[i]) for i in pending))
    write_parquet_atomic(out / "summary.parquet", summary)
    counts = dict(zip(summary["model"].to_pylist(), summary["images"].to_pylist(), strict=True))
    job = {
        "kind": "caption",
        "spec": asdict(cfg),
        "versions": package_versions("capfleet", "ray", "ai-edge-litert", "pyarrow"),
        "start": started.isoformat(timespec="seconds"),
        "end": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 2),
        "ray_start_seconds": round(ray_start, 2),  # starting or joining Ray, within the wall
        "images": len(records),
        "rows": counts,
        "shards": {"total": len(shards), "run": len(pending)},
    }
    write_json_atomic(out / "job.json", job)
    _print_summary(summary, log)
    return job


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
