"""A frozen backbone's features across the cluster: one Ray task converts the backbone to its
fp32 LiteRT flatbuffer (kept in the feature cache, so once per backbone), then a Ray Data job
over shards of a split's images, one autoscaling pool of 1-CPU actors (each running that
flatbuffer, without TensorFlow), writes every shard's features as its own .npy part. Parts
already whole are skipped, so a job that died (or lost a node) resumes where it stopped; then
the parts are joined into the cache file training reads (model/features.py: keyed as
cached_features keys it). The cache folder must be one every node sees (a shared file system)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from capfleet.cluster.connect import first_line, ray_session
from capfleet.compression.export import export_backbone
from capfleet.model.data import SPLITS, read_split
from capfleet.model.encoders import encoder_info
from capfleet.model.errors import CapfleetError
from capfleet.model.features import (
    FEATURE_BATCH,
    FEATURE_SHARD,
    FeatureWorker,
    assemble_parts,
    backbone_file,
    backbone_problem,
    cache_file,
    done_parts,
)
from capfleet.model.train_config import TrainConfig


class _Worker(FeatureWorker):
    """The Ray Data callable: one shard per call, into its split's parts folder; says which
    node computed it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        import ray

        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        shard, folder = int(batch["shard"][0]), str(batch["folder"][0])
        ids, uris = [str(i) for i in batch["ids"][0]], [str(u) for u in batch["uris"][0]]
        row = self.write_part(folder, shard, ids, uris, {"node": self.node})
        return {k: [v] for k, v in {**row, "folder": folder, "node": self.node}.items()}


def compute_features(
    cfg: TrainConfig,
    address: str | None = None,
    shard_size: int = FEATURE_SHARD,
    max_actors: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Train, dev and test features of cfg's frozen backbone into cfg.feature_cache, computed on
    every CPU of the cluster, the splits in one job (training reads train and dev, its test
    scoring the test split's). Returns, per split, the parts run now and the
    nodes that ran them, the seconds taken, and of them the seconds spent converting the
    backbone to LiteRT (0 when the cache has it)."""
    info = encoder_info(cfg.encoder)
    if info.trainable:
        return {}
    t0, cache, splits, items = time.perf_counter(), Path(cfg.feature_cache), {}, []
    for split in SPLITS:
        records = read_split(cfg.data, split)
        # keyed by every listed image (path, size, mtime), as the cache file is: a rerun on
        # the same images finds its parts, changed images start afresh
        final = cache_file(cache, info.name, cfg.weights_id, records)
        if final.is_file():  # every image decoded, already joined: nothing to do
            log(f"features: {split} cached ({final.name})")
            continue
        folder = final.with_suffix(".parts").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        shards = math.ceil(len(records) / shard_size)
        done = done_parts(folder, shards)
        todo = [n for n in range(shards) if n not in done]
        log(
            f"features: {info.name} of {len(records)} {split} images, {shards} parts "
            f"({len(done)} done before)"
        )
        splits[split] = (records, folder)
        items += [
            {
                "shard": n,
                "folder": str(folder),
                "ids": [r.image_id for r in records[n * shard_size : (n + 1) * shard_size]],
                "uris": [r.uri for r in records[n * shard_size : (n + 1) * shard_size]],
            }
            for n in todo
        ]
    rows, convert_s = [], 0.0
    if items:  # every split's parts in one job: one pool of actors, each loads the backbone once
        with ray_session(address) as ray:
            model, convert_s = _backbone(ray, cfg, cache, log)
            rows = _run(ray, cfg, model, items, max_actors)
    report = {s: {"parts_run": 0, "nodes": []} for s in SPLITS}
    for split, (records, folder) in splits.items():
        assemble_parts(folder, records, info.name, cfg.weights_id, cache, shard_size, log)
        mine = [r for r in rows if r["folder"] == str(folder)]
        report[split] = {"parts_run": len(mine), "nodes": sorted({r["node"] for r in mine})}
    seconds = time.perf_counter() - t0
    if splits:
        nodes = len({r["node"] for r in rows})
        log(f"features: {len(rows)} parts done in {seconds:.0f} s on {nodes} node(s)")
    return {**report, "seconds": round(seconds, 1), "convert_seconds": round(convert_s, 1)}


def _backbone(ray, cfg: TrainConfig, cache: Path, log: Callable[[str], None]):
    """(the backbone's flatbuffer in the cache, seconds taken to make it): converted by a Ray
    task when not there yet, in a worker of its own (max_calls=1: VGG16's conversion peaks at
    5.4 GB, which ends with that process)."""
    path = backbone_file(cache, cfg.encoder, cfg.weights_id).resolve()
    if path.is_file():
        problem = backbone_problem(path, cfg.encoder)
        if problem is None:
            return str(path), 0.0
        log(f"features: {path.name} is no {cfg.encoder} backbone ({problem}): converting again")
        path.unlink()
    t0 = time.perf_counter()
    weights = cfg.weights_arg
    if weights and Path(weights).is_file():  # the task may run on another node: no relative path
        weights = str(Path(weights).resolve())
    task = ray.remote(num_cpus=1, max_calls=1, max_retries=1)(export_backbone)
    try:
        ray.get(task.remote(cfg.encoder, weights, cfg.seed, str(path)))
    except ray.exceptions.RayError as e:  # raised in the task, or its worker died (memory)
        cause = getattr(e, "cause", None) or e
        raise CapfleetError(
            f"features: converting {cfg.encoder} to LiteRT failed: {first_line(cause)}"
        ) from e
    seconds = time.perf_counter() - t0
    log(f"features: {cfg.encoder} converted to LiteRT in {seconds:.0f} s ({path.name})")
    return str(path), seconds


def _run(ray, cfg: TrainConfig, model: str, items: list[dict], max_actors: int):
    cpus = int(ray.cluster_resources().get("CPU", 1))
    high = max(1, min(max_actors or cpus, cpus, len(items)))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _Worker,
        fn_constructor_kwargs={
            "model_file": model,
            "encoder": cfg.encoder,
            "threads": 1,
            # small shards: no padding
            "batch": min(FEATURE_BATCH, max(len(i["ids"]) for i in items)),
        },
        batch_size=1,
        batch_format="numpy",
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=high, initial_size=high),
        max_restarts=-1,  # a lost node's actors start again elsewhere; their shards are retried
        max_task_retries=3,
    )
    return ds.take_all()
