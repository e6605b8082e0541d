"""Bulk captioning, the pure half: output schemas, shards, reading, decoding and the worker.

No Ray here. cluster/caption_pipeline.py wires these into a Ray Data pipeline; a test can call
every piece on a hand-built batch.

Work is cut into shards of consecutive input images. A shard's output for one model is one
Parquet file, written atomically, so a rerun into the same output directory does only the
shards that are missing and never writes a row twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.artifacts import write_bytes_atomic, write_json_atomic
from model.data import ImageRecord
from model.errors import CapfleetError
from model.images import UNREADABLE, ImageError, decode_image

# One row per (image, model). Declared once; every writer and reader uses it.
CAPTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("model", pa.string()),
        ("caption", pa.string()),  # null when status is "error"
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),  # reason, e.g. "truncated: image file is truncated"; null when ok
        ("latency_ms", pa.float64()),  # the batch's encode + decode time divided by its size
        ("batch_size", pa.int32()),
        ("worker", pa.string()),  # host:pid of the actor that captioned it
        ("shard", pa.int32()),
    ]
)

# One row per model.
SUMMARY_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("images", pa.int64()),
        ("ok", pa.int64()),
        ("failed", pa.int64()),
        ("throughput_img_s", pa.float64()),  # images captioned by this run / its wall time
        ("latency_p50_ms", pa.float64()),
        ("latency_p95_ms", pa.float64()),
        ("size_mb", pa.float64()),
        ("gzip_size_mb", pa.float64()),
        ("bleu1", pa.float64()),  # null without references
        ("bleu2", pa.float64()),
        ("bleu3", pa.float64()),
        ("bleu4", pa.float64()),
    ]
)

OK, ERROR = "ok", "error"


PLAN_FILE = "plan.json"


def check_plan(
    out: str | Path, cfg_shard_size: int, records: Sequence[ImageRecord], bundles: dict[str, str]
) -> None:
    """Resume is by part files, so it is only sound for the same cut of the same input into
    the same models. The first run writes OUT/plan.json; a rerun that differs is refused."""
    ids = hashlib.sha256("\n".join(r.image_id for r in records).encode()).hexdigest()
    plan = {
        "shard_size": cfg_shard_size,
        "images": len(records),
        "image_ids_sha256": ids,
        "bundles": bundles,
    }
    path = Path(out) / PLAN_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key, value in plan.items():
            if key == "bundles":
                changed = [n for n, sha in value.items() if old["bundles"].get(n, sha) != sha]
                if changed:
                    raise CapfleetError(
                        f"{out}: bundle {changed[0]!r} differs from the one that wrote this "
                        "output; use a new --out (or a new bundle name)"
                    )
            elif old.get(key) != value:
                raise CapfleetError(
                    f"{out}: was written with a different {key} ({old.get(key)} vs {value}); "
                    "resume needs the same input and shard size, or use a new --out"
                )
        plan["bundles"] = {**old["bundles"], **bundles}
    write_json_atomic(path, plan)


def write_parquet_atomic(path: str | Path, table: pa.Table) -> None:
    """A Parquet file that readers see whole or not at all."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


def part_path(out: str | Path, model: str, shard: int) -> Path:
    return Path(out) / "captions" / f"model={model}" / f"part-{shard:06d}.parquet"


def shard_records(records: Sequence[ImageRecord], shard_size: int) -> list[list[ImageRecord]]:
    """Consecutive, fixed shards: the same input always cuts the same way, so a rerun knows
    which shards are done by the files alone."""
    return [list(records[i : i + shard_size]) for i in range(0, len(records), shard_size)]


def missing_models(out: str | Path, models: Sequence[str], shard: int) -> list[str]:
    return [m for m in models if not part_path(out, m, shard).is_file()]


def read_uri(uri: str) -> bytes | ImageError:
    """The bytes behind a local path, file:// or object-store URI (pyarrow filesystems)."""
    from pyarrow import fs

    try:
        if "://" in uri:
            filesystem, path = fs.FileSystem.from_uri(uri)
        else:
            filesystem, path = fs.LocalFileSystem(), os.path.abspath(uri)
        with filesystem.open_input_stream(path) as f:
            return f.read()
    except Exception as e:  # noqa: BLE001  any failure to read is one error row
        return ImageError(UNREADABLE, f"{type(e).__name__}: {e}")


def decode_batch(batch: dict, sizes: Sequence[int]) -> dict:
    """Read and decode every image of a shard for each input size the bundles need.

    batch: {"shard": (1,), "image_id": (1,) list, "uri": (1,) list} -> adds, per size S,
    "image_S": (1, N, S, S, 3) uint8 and "error": (1,) list of N reasons ("" when fine).
    """
    uris = list(batch["uri"][0])
    errors = [""] * len(uris)
    images = {s: np.zeros((len(uris), s, s, 3), np.uint8) for s in sizes}
    for i, uri in enumerate(uris):
        data = read_uri(uri)
        if isinstance(data, ImageError):
            errors[i] = str(data)
            continue
        for s in sizes:
            out = decode_image(data, (s, s))
            if isinstance(out, ImageError):
                errors[i] = str(out)
                break
            images[s][i] = out
    result = dict(batch)
    result["error"] = np.array([np.array(errors, dtype=object)], dtype=object)
    for s, arr in images.items():
        result[f"image_{s}"] = arr[None]
    return result


class CaptionWorker:
    """Hosts one bundle; `__call__` captions one shard and writes its Parquet part.

    Follows Ray's batch-inference shape (load once in __init__, map a batch in __call__) and
    holds no Ray code. A shard whose part already exists is passed over (resume).
    """

    def __init__(
        self,
        bundle_dir: str,
        name: str,
        out: str,
        batch_size: int = 64,
        num_threads: int = 1,
        beam_width: int = 1,
        last: bool = True,
    ):
        from model.bundle import BundleRunner

        self.runner = BundleRunner(bundle_dir, num_threads=num_threads, beam_width=beam_width)
        self.name = name
        self.out = out
        self.batch_size = batch_size
        self.last = last  # the last model passes on only the shard id, not the images
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        shard = int(batch["shard"][0])
        path = part_path(self.out, self.name, shard)
        if not path.is_file():
            table = self.caption_shard(
                shard,
                list(batch["image_id"][0]),
                list(batch["uri"][0]),
                list(batch["error"][0]),
                batch[f"image_{self.runner.input_size}"][0],
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            write_parquet_atomic(path, table)
        return {"shard": batch["shard"]} if self.last else batch

    def caption_shard(
        self, shard: int, ids: list, uris: list, errors: list, images: np.ndarray
    ) -> pa.Table:
        """Caption a shard's good images in batches; bad ones become error rows."""
        n = len(ids)
        captions: list[str | None] = [None] * n
        latency = [float("nan")] * n
        bsizes = [0] * n
        good = [i for i in range(n) if not errors[i]]
        for start in range(0, len(good), self.batch_size):
            idx = good[start : start + self.batch_size]
            t0 = time.perf_counter()
            caps = self.runner.caption(images[idx])
            per_image = 1000 * (time.perf_counter() - t0) / len(idx)
            for i, c in zip(idx, caps, strict=True):
                captions[i], latency[i], bsizes[i] = c, per_image, len(idx)
        return pa.table(
            {
                "image_id": ids,
                "uri": uris,
                "model": [self.name] * n,
                "caption": captions,
                "status": [ERROR if e else OK for e in errors],
                "error": [e or None for e in errors],
                "latency_ms": [None if e else v for e, v in zip(errors, latency, strict=True)],
                "batch_size": [b or None for b in bsizes],
                "worker": [self.worker] * n,
                "shard": [shard] * n,
            },
            schema=CAPTION_SCHEMA,
        )


def read_captions(out: str | Path, model: str | None = None) -> pa.Table:
    """Every caption row written so far (all models, or one)."""
    root = Path(out) / "captions"
    pattern = f"model={model}/part-*.parquet" if model else "model=*/part-*.parquet"
    parts = sorted(root.glob(pattern))
    if not parts:
        return CAPTION_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(p, schema=CAPTION_SCHEMA) for p in parts)


# -- the job's configuration and its summary ---------------------------------------------------

_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class CaptionConfig:
    """One caption job. Validated on construction, before any work."""

    bundles: tuple[str, ...]  # bundle directories; each model's name is its manifest's name
    input: str  # folder, manifest (.parquet/.csv), Flickr8k directory or COCO JSON
    out: str
    split: str = ""  # Flickr8k: "" = test; Karpathy JSON: "" = every image; else ignored
    references: str = ""  # a captioned data set to score against ("" = the input's own)
    address: str = ""  # "" = embedded local Ray; "auto" or "ray://host:10001"
    batch_size: int = 256  # images per model call
    shard_size: int = 1024  # images per output part file (the unit of resume)
    actors: int = 1  # actors per bundle
    actor_cpus: float = 0.5  # CPUs per actor (its interpreter gets as many threads, >= 1)
    # CPUs per decode task. Equal to actor_cpus, Ray Data fuses decoding into the actors (the
    # faster choice on one small machine, measured); different, decoding runs as its own tasks.
    decode_cpus: float = 0.5
    beam_width: int = 1
    names: tuple[str, ...] = field(default=())  # filled from the bundles' manifests

    def __post_init__(self) -> None:
        if not self.bundles:
            raise CapfleetError("bundles: give at least one bundle directory")
        for key in ("batch_size", "shard_size", "actors", "beam_width"):
            if getattr(self, key) < 1:
                raise CapfleetError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("actor_cpus", "decode_cpus"):
            if not 0 < getattr(self, key) <= 64:
                raise CapfleetError(f"{key}: must be in (0, 64], got {getattr(self, key)}")
        if not self.names and all(Path(b).is_dir() for b in self.bundles):
            # bundles that do not exist yet (a spec loaded before its pipeline made them)
            # get their names when the job starts; run_caption_job refuses missing ones
            from model.bundle import read_manifest

            names = tuple(
                str(read_manifest(b, verify=False).get("name") or Path(b).name)
                for b in self.bundles
            )
            object.__setattr__(self, "names", names)
        bad = [n for n in self.names if not n or set(n) - _NAME_OK]
        if bad:
            raise CapfleetError(f"bundle name {bad[0]!r}: use letters, digits, '.', '_', '-'")
        if len(set(self.names)) != len(self.names):
            raise CapfleetError(f"two bundles share a name: {', '.join(self.names)}")


def summarize(
    out: str | Path,
    cfg: CaptionConfig,
    records: Sequence[ImageRecord],
    wall_s: float,
    images_run: int,
) -> pa.Table:
    """One row per model from the Parquet written, with BLEU where references exist.

    Throughput is the images captioned by this run over its wall time (null when a rerun had
    nothing left to do)."""
    from model.bundle import read_manifest
    from model.metrics import corpus_bleu_scores
    from model.text import clean_caption

    refs = {r.image_id: [clean_caption(c) for c in r.captions] for r in records if r.captions}
    rows = []
    for bundle, name in zip(cfg.bundles, cfg.names, strict=True):
        t = read_captions(out, name).to_pylist()
        ok = [r for r in t if r["status"] == OK]
        lat = np.array([r["latency_ms"] for r in ok], dtype=np.float64)
        scored = [r for r in ok if refs.get(r["image_id"])]
        bleu = (
            corpus_bleu_scores(
                [refs[r["image_id"]] for r in scored], [r["caption"] for r in scored]
            )
            if scored
            else {}
        )
        manifest = read_manifest(bundle, verify=False)
        rows.append(
            {
                "model": name,
                "images": len(t),
                "ok": len(ok),
                "failed": len(t) - len(ok),
                "throughput_img_s": images_run / wall_s if images_run and wall_s > 0 else None,
                "latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                "latency_p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
                "size_mb": manifest.get("size_mb"),
                "gzip_size_mb": manifest.get("gzip_size_mb"),
                **{k: bleu.get(k) for k in ("bleu1", "bleu2", "bleu3", "bleu4")},
            }
        )
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
