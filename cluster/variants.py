"""Training variants as Ray tasks: every variant of a train spec's [grid] at once, each task with
`threads` CPUs (1 when 0) and TensorFlow limited to them, a fresh worker process per variant.

Frozen backbones' features are computed first, once per distinct backbone, by one task each;
the variants then read them from the shared feature cache instead of each computing them.
A variant that raises becomes a failed row; a worker that dies is retried `max_retries` times.
A variant whose model directory was trained from the very same spec is kept, not retrained.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from cluster.connect import completed, failure_text, first_line, ray_session
from model.captioning import write_parquet_atomic
from model.encoders import encoder_info
from model.training import VARIANT_SCHEMA, TrainConfig, train, variant_row, warm_feature_cache

VARIANTS_FILE = "variants.parquet"


def _train_task(name: str, cfg: TrainConfig) -> dict:
    started = time.time()
    try:
        row = variant_row(name, cfg, train(cfg), None)
    except Exception as e:  # noqa: BLE001  one failed variant must not sink the job
        row = variant_row(name, cfg, None, failure_text(e))
    return {**row, "started": started, "finished": time.time()}


def _trained(cfg: TrainConfig) -> dict | None:
    """The manifest of a model directory trained from exactly this spec, if there is one."""
    path = Path(cfg.out) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("train") == asdict(cfg) else None


def _cache_key(cfg: TrainConfig) -> tuple:
    return (cfg.encoder, cfg.weights_id, cfg.data, cfg.feature_cache)


def run_train_job(
    grid,
    address: str | None = None,
    max_retries: int = 1,
    log: Callable[[str], None] = print,
) -> pa.Table:
    """Train every variant of a jobs.specs.TrainGrid on Ray; writes <out>/variants.parquet."""
    t0 = time.perf_counter()
    out = Path(grid.out)
    out.mkdir(parents=True, exist_ok=True)
    frozen = {}
    for cfg in grid.variants:
        if not encoder_info(cfg.encoder).trainable:
            frozen.setdefault(_cache_key(cfg), cfg)
    rows = {}
    todo = []
    for name, cfg in zip(grid.names, grid.variants, strict=True):
        done = _trained(cfg)
        if done:  # trained by an earlier run with this very spec
            rows[name] = {**variant_row(name, cfg, done, None), "started": None, "finished": None}
            log(f"train: {name} already trained in {cfg.out}")
        else:
            todo.append((name, cfg))
    frozen = {k: c for k, c in frozen.items() if any(_cache_key(t) == k for _, t in todo)}
    with ray_session(address) as ray:
        if frozen:
            log(f"train: computing features of {len(frozen)} frozen backbone(s) once")
            warm = ray.remote(num_cpus=1, max_calls=1)(warm_feature_cache)
            ray.get([warm.remote(c, print) for c in frozen.values()])
        task = ray.remote(max_retries=max_retries, max_calls=1)(_train_task)
        pending = {
            task.options(num_cpus=max(1, cfg.threads)).remote(name, cfg): (name, cfg)
            for name, cfg in todo
        }
        if pending:
            log(f"train: {len(pending)} variants on Ray into {out}")
        for (name, cfg), row, crash in completed(ray, pending):
            if crash is not None:  # the worker died, retries spent
                row = variant_row(name, cfg, None, f"{type(crash).__name__}: {first_line(crash)}")
            rows[name] = row
            if row["status"] == "ok":
                what = (
                    f"BLEU-4 {row['bleu4']:.3f}, {row['epochs_run']} epochs in "
                    f"{row['train_seconds']:.0f} s"
                )
            else:
                what = f"FAILED {row['error'].splitlines()[0]}"
            log(f"[{len(rows)}/{len(grid.names)}] {name}: {what}")
    table = pa.Table.from_pylist([rows[n] for n in grid.names], schema=VARIANT_SCHEMA)
    write_parquet_atomic(out / VARIANTS_FILE, table)
    log(f"train: {len(rows)} variants in {time.perf_counter() - t0:.0f} s; {out / VARIANTS_FILE}")
    return table
