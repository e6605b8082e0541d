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
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow as pa

from capfleet.cluster.connect import failure_text, ray_session
from capfleet.cluster.tasks import run_tasks
from capfleet.core.artifacts import write_json_atomic, write_parquet_atomic
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import is_uri, local, mirror, place, staging
from capfleet.jobs.skeleton import JobRun
from capfleet.jobs.train.feature_job import compute_features
from capfleet.model.data import data_identity
from capfleet.model.encoders import encoder_info
from capfleet.model.modeldir import MANIFEST_FILE, read_model_manifest
from capfleet.model.train_config import TrainConfig, TrainGrid
from capfleet.model.training import train

VARIANTS_FILE = "variants.parquet"

# variants.parquet: one row per trained variant of a train job with a [grid].
VARIANT_SCHEMA = pa.schema(
    [
        ("variant", pa.string()),  # the grid values that make it, e.g. "learning_rate=0.003"
        ("model_dir", pa.string()),
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),
        ("encoder", pa.string()),
        ("weights", pa.string()),
        ("units", pa.int32()),
        ("embed_dim", pa.int32()),
        ("dropout", pa.float64()),
        ("learning_rate", pa.float64()),
        ("label_smoothing", pa.float64()),
        ("batch_size", pa.int32()),
        ("seed", pa.int32()),
        ("epochs_run", pa.int32()),
        ("train_seconds", pa.float64()),
        ("bleu1", pa.float64()),  # Keras greedy captions of the test split
        ("bleu2", pa.float64()),
        ("bleu3", pa.float64()),
        ("bleu4", pa.float64()),
        ("cider_d", pa.float64()),  # IDF from the test split's references
        ("rouge_l", pa.float64()),
        ("content_accuracy", pa.float64()),  # shapes data only
        ("spec", pa.string()),  # the variant's whole TrainConfig, JSON
        ("started", pa.float64()),  # Unix time
        ("finished", pa.float64()),
    ]
)


# The test-split scores a variant row takes from its model manifest's test_metrics.
SCORES = ("bleu1", "bleu2", "bleu3", "bleu4", "cider_d", "rouge_l")


def variant_row(name: str, cfg: TrainConfig, manifest: dict | None, error: str | None) -> dict:
    """A variants.parquet row for a trained (manifest) or failed (error) variant."""
    m = (manifest or {}).get("test_metrics", {})
    return {
        "variant": name,
        "model_dir": cfg.out,
        "status": "ok" if manifest else "error",
        "error": error,
        **{k: getattr(cfg, k) for k in ("encoder", "weights", "units", "embed_dim")},
        **{k: getattr(cfg, k) for k in ("dropout", "learning_rate", "label_smoothing")},
        **{k: getattr(cfg, k) for k in ("batch_size", "seed")},
        "epochs_run": (manifest or {}).get("epochs_run"),
        "train_seconds": (manifest or {}).get("train_seconds"),
        **{k: m.get(k) for k in (*SCORES, "content_accuracy")},
        "spec": json.dumps(asdict(cfg), sort_keys=True),
    }


def train_anywhere(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """`train`, for a model directory or data set in an object store too: the model written to
    local scratch and published with its manifest last (staging); the manifest records the
    spec as given (URIs), not the copies. A trainable encoder reads the data from this node's
    copy (mirror); a frozen backbone's variant reads only the data set's text and listing from
    the store, its images' features from the feature cache, and copies nothing."""
    if not (is_uri(cfg.out) or is_uri(cfg.data)):
        return train(cfg, log=log)
    with staging(cfg.out) as out:
        # the features where the feature job put them: mirror keeps the images' times, so
        # this node's copy of the data keys its features as the store's images do
        data = str(mirror(cfg.data)) if encoder_info(cfg.encoder).trainable else cfg.data
        local_cfg = replace(cfg, out=str(out), data=data, cache_dir=cfg.feature_cache)
        manifest = train(local_cfg, log=log)
        manifest = {
            **manifest,
            "train": asdict(cfg),
            "data_from_model": None,
            "data_identity": data_identity(cfg.data),  # the store's, as _trained compares
        }
        manifest["test_metrics"] = {**manifest.get("test_metrics", {}), "data": cfg.data}
        write_json_atomic(Path(out) / MANIFEST_FILE, manifest)
    return manifest


def _train_task(name: str, cfg: TrainConfig) -> dict:
    started = time.time()
    try:
        row = variant_row(name, cfg, train_anywhere(cfg), None)
    except Exception as e:  # noqa: BLE001  one failed variant must not sink the job
        row = variant_row(name, cfg, None, failure_text(e))
    return {**row, "started": started, "finished": time.time()}


def _trained(cfg: TrainConfig) -> dict | None:
    """The manifest of a model directory trained from exactly this spec on exactly this data (the
    spec names the data's folder; rewriting it, say with another shapes seed, keeps the name),
    if there is one."""
    try:
        manifest = read_model_manifest(cfg.out)
    except CapfleetError:  # none yet, or unreadable: train it
        return None
    if manifest.get("train") != asdict(cfg):
        return None
    if manifest.get("data_identity") != data_identity(cfg.data):
        return None
    return manifest


def _cache_key(cfg: TrainConfig) -> tuple:
    return (cfg.encoder, cfg.weights_id, cfg.data, cfg.feature_cache)


def run_train_job(
    grid: TrainGrid,
    address: str | None = None,
    max_retries: int = 1,
    log: Callable[[str], None] = print,
    frame: bool = True,
) -> pa.Table:
    """Train every variant of a TrainGrid on Ray; writes <out>/variants.parquet and job.json.
    Without `frame` (one model trained as a grid of one: its caller locks the model's folder)
    grid.out is neither locked nor given a job.json."""
    if not frame:
        with ray_session(address):
            return _train_variants(grid, address, max_retries, log)
    run = JobRun("train", grid.out, asdict(grid), log)
    with run:
        with run.ray(address):
            table = _train_variants(grid, address, max_retries, log)
        ok = sum(s == "ok" for s in table["status"].to_pylist())
        log(f"train: {len(table)} variants in {run.wall:.0f} s; {place(grid.out) / VARIANTS_FILE}")
        run.finish(variants=len(table), ok=ok, failed=len(table) - ok)
    return table


def _train_variants(grid: TrainGrid, address, max_retries: int, log) -> pa.Table:
    out = local(grid.out)
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
    with ray_session(address):
        if frozen:
            log(f"train: computing features of {len(frozen)} frozen backbone(s) once")
            for c in frozen.values():  # each across every CPU of the cluster, the workers
                compute_features(c, address, log=log)  # reading a store's images themselves
        if todo:
            log(f"train: {len(todo)} variants on Ray into {out}")
        calls = [((name, cfg), (name, cfg), max(1, cfg.threads)) for name, cfg in todo]
        for (name, cfg), row, crash in run_tasks(_train_task, calls, max_retries):
            if crash is not None:  # the worker died, retries spent
                row = variant_row(name, cfg, None, str(crash))
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
    return table
