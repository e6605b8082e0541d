"""A frozen backbone's features across the cluster: one Ray task converts the backbone to its
fp32 LiteRT flatbuffer (kept in the feature cache, so once per backbone), then the executor's
pool (cluster/pool.py: 1-CPU actors, each running that flatbuffer without TensorFlow, the same
tries and notes as the caption job's) writes the features of every shard of a split's images
as its own .npy part. Parts already whole are skipped, so a job that died (or lost a node)
resumes where it stopped; then the parts are joined into the cache file training reads
(model/features.py: keyed as cached_features keys it). The cache folder must be one every
node sees: an object store (where the images may be too), or a shared file system. Nothing
else is shared: the workers read the images and the backbone from where they lie (a node
copies the flatbuffer from a store once), and write their parts there."""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from capfleet.cluster.connect import ray_session
from capfleet.cluster.pool import Pool, run_units
from capfleet.cluster.tasks import TaskFailed, run_task
from capfleet.compression.export import export_backbone
from capfleet.core.artifacts import write_bytes_atomic, write_json_atomic
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import StorePath, local, mirror, place
from capfleet.model.data import SPLITS, ImageRecord, read_split
from capfleet.model.encoders import encoder_info
from capfleet.model.features import (
    backbone_file,
    backbone_problem,
    cache_file,
    decode_files,
    load_npy,
    npy_rows,
    predict_batches,
    write_cache,
)
from capfleet.model.train_config import TrainConfig

FEATURE_SHARD = 256  # images per part: a unit of work and of resume
FEATURE_TRIES = 4  # starts of a part before it fails the job (a lost node's parts start again)
FEATURE_BATCH = 32  # images per backbone call: a CNN's activations grow with it


class FeatureWorker:
    """One process's frozen backbone: a shard of image paths in, its features written as one
    .npy part (the images that decoded) with a .json of their ids and the ones that did not.

    The backbone runs as its fp32 LiteRT flatbuffer (`backbone_file`), on one thread, with no
    TensorFlow in the process. Its features equal Keras's within 1e-4 of their scale (tested).
    With one worker per core LiteRT is the faster engine and the smaller process
    (bench/README.md, feature_rate)."""

    def __init__(
        self, model_file: str | Path, encoder: str, threads: int = 1, batch: int = FEATURE_BATCH
    ):
        from ai_edge_litert.interpreter import Interpreter

        self.info = encoder_info(encoder)
        self.batch = batch
        model_file = mirror(model_file)  # from a store: this node's copy, made once per node
        if not Path(model_file).is_file():
            raise CapfleetError(
                f"{model_file}: not on this node (the feature cache must be where every node "
                "reads it: an object store or a shared folder)"
            )
        try:  # mapped from the file (XNNPACK keeps a packed copy of the weights)
            it = Interpreter(model_path=str(model_file), num_threads=threads)
            self._runner = it.get_signature_runner()
        except (OSError, ValueError, RuntimeError) as e:
            raise CapfleetError(f"{model_file}: not a backbone LiteRT can load ({e})") from e

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        """Features of up to `batch` preprocessed images (named as Keras's, for predict_batches).
        One interpreter at one batch size, a short batch padded: each size would hold its own
        packed copy of the weights."""
        n = len(x)
        if n < self.batch:
            x = np.concatenate([x, np.zeros((self.batch - n, *x.shape[1:]), x.dtype)])
        return self._runner(image=x)["features"][:n]

    def features(self, uris: Sequence[str]) -> tuple[np.ndarray, list[int], list[str]]:
        """(features of the images that decoded, their positions, the others' reasons)."""
        images, kept, bad = decode_files(uris, self.info.input_size)
        if not images:
            return np.zeros((0, 0), np.float32), kept, bad
        feats = predict_batches(self, np.stack(images), self.batch, self.info.preprocess)
        return feats.astype(np.float32, copy=False), kept, bad

    def write_part(
        self,
        folder: str | Path,
        shard: int,
        ids: Sequence[str],
        uris: Sequence[str],
        note: dict | None = None,
    ) -> dict:
        """Compute and write one part; `note` is kept in its .json (who computed it)."""
        feats, kept, bad = self.features(uris)
        folder = place(folder)
        buf = io.BytesIO()
        np.save(buf, feats)
        # the ids first: a part counts as done once its .npy exists, so that goes last
        meta = {"ids": [ids[i] for i in kept], "skipped": bad, **(note or {})}
        write_json_atomic(folder / f"part-{shard:06d}.json", meta)
        write_bytes_atomic(folder / f"part-{shard:06d}.npy", buf.getvalue())
        return {"shard": shard, "images": len(kept), "skipped": len(bad)}

    def __call__(self, unit: dict) -> dict:
        """One unit of the feature job (the pool's shape): a shard of a split into its folder;
        the part's .json says which node computed it."""
        ids, uris = [str(i) for i in unit["ids"]], [str(u) for u in unit["uris"]]
        note = {"node": str(unit["node"])}
        row = self.write_part(str(unit["folder"]), int(unit["shard"]), ids, uris, note)
        return {**row, "folder": str(unit["folder"])}


def done_parts(folder: str | Path | StorePath, shards: int) -> set[int]:
    """Shards whose part is whole: its .npy's rows (read from its header) match its .json's ids.
    The folder is listed once (an object store answers a listing, not a look-up per part)."""
    folder = place(folder)
    names = {p.name for p in folder.glob("part-*")}
    done = set()
    for n in range(shards):
        npy, meta = folder / f"part-{n:06d}.npy", folder / f"part-{n:06d}.json"
        if npy.name not in names or meta.name not in names:
            continue
        try:
            if npy_rows(npy) == len(json.loads(meta.read_text())["ids"]):
                done.add(n)
        except (OSError, ValueError, KeyError):
            continue
    return done


def assemble_parts(
    folder: str | Path | StorePath,
    records: Sequence[ImageRecord],
    encoder: str,
    weights_id: str,
    cache_dir: str | Path | StorePath,
    shard_size: int = FEATURE_SHARD,
    log: Callable[[str], None] = print,
) -> Path | StorePath:
    """Join a split's parts, in order, into the cache file that cached_features() reads for the
    records that decoded (the same key load_images' kept records give)."""
    folder = place(folder)
    shards = math.ceil(len(records) / shard_size)
    feats, kept, skipped = [], [], []
    for n in range(shards):
        meta = json.loads((folder / f"part-{n:06d}.json").read_text())
        arr = load_npy(folder / f"part-{n:06d}.npy")
        chunk = records[n * shard_size : (n + 1) * shard_size]
        by_id = {r.image_id: r for r in chunk}
        kept += [by_id[i] for i in meta["ids"]]
        skipped += meta["skipped"]
        if len(arr):
            feats.append(arr)
    if skipped:
        log(f"skipped {len(skipped)} unreadable images, e.g. {skipped[0]}")
    if not feats:
        raise CapfleetError(f"none of {len(records)} images could be read")
    return write_cache(cache_dir, encoder, weights_id, kept, np.concatenate(feats))


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
    t0, cache, splits, items = time.perf_counter(), local(cfg.feature_cache), {}, []
    for split in SPLITS:
        records = read_split(cfg.data, split)
        # keyed by every listed image (id, name, size, mtime), as the cache file is: a rerun on
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
                "unit": len(items) + k,
                "shard": n,
                "folder": str(folder),
                "ids": [r.image_id for r in records[n * shard_size : (n + 1) * shard_size]],
                "uris": [r.uri for r in records[n * shard_size : (n + 1) * shard_size]],
            }
            for k, n in enumerate(todo)
        ]
    rows, convert_s = [], 0.0
    if items:  # every split's parts in one job: one pool of actors, each loads the backbone once
        with ray_session(address):
            model, convert_s = _backbone(cfg, cache, log)
            rows = _run(cfg, model, cache, items, max_actors)
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


def _backbone(cfg: TrainConfig, cache: Path | StorePath, log: Callable[[str], None]):
    """(the backbone's flatbuffer in the cache, seconds taken to make it): converted by a Ray
    task when not there yet, in a process of its own (the converter's peak memory ends with
    it)."""
    path = backbone_file(cache, cfg.encoder, cfg.weights_id).resolve()
    if path.is_file():
        problem = backbone_problem(mirror(path), cfg.encoder)
        if problem is None:
            return str(path), 0.0
        log(f"features: {path.name} is no {cfg.encoder} backbone ({problem}): converting again")
        path.unlink()
    t0 = time.perf_counter()
    weights = cfg.weights_arg
    if weights and Path(weights).is_file():  # the task may run on another node: no relative path
        weights = str(Path(weights).resolve())
    try:  # in a process of its own: the converter's peak memory ends with it
        run_task(
            export_backbone,
            *(cfg.encoder, weights, cfg.seed, str(path)),
            max_retries=1,
            fresh_process=True,
        )
    except TaskFailed as e:  # raised in the task, or its worker died (memory)
        raise CapfleetError(
            f"features: converting {cfg.encoder} to LiteRT failed: {e.detail}"
        ) from e
    seconds = time.perf_counter() - t0
    log(f"features: {cfg.encoder} converted to LiteRT in {seconds:.0f} s ({path.name})")
    return str(path), seconds


def _run(cfg: TrainConfig, model: str, cache, items: list[dict], max_actors: int):
    pool = Pool(
        worker=FeatureWorker,
        kwargs={
            "model_file": model,
            "encoder": cfg.encoder,
            "threads": 1,
            # small shards: no padding
            "batch": min(FEATURE_BATCH, max(len(i["ids"]) for i in items)),
        },
        notes=str(cache.resolve()),
        actors=max_actors,
        tries=FEATURE_TRIES,
    )
    rows = []
    failed = run_units(items, pool, rows.append)
    if failed:
        unit, why = next(iter(failed.items()))
        raise CapfleetError(
            f"features: {len(failed)} parts failed after {FEATURE_TRIES} tries, e.g. "
            f"{items[unit]['folder']} part {items[unit]['shard']}: {why}; rerun to retry them"
        )
    return rows
