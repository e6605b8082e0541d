"""The caption worker: hosts one bundle and turns a decoded shard into its Parquet part."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pyarrow as pa

from capfleet.model.artifacts import write_parquet_atomic
from capfleet.model.bulk.schema import CAPTION_SCHEMA, ERROR, OK
from capfleet.model.bulk.writer import part_path
from capfleet.model.bundle import BundleRunner


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
        keep_images: bool = False,
    ):
        self.runner = BundleRunner(bundle_dir, num_threads=num_threads, beam_width=beam_width)
        self.name = name
        self.out = out
        self.batch_size = batch_size
        # hand the decoded images on to the next model's pool; the last pool returns only the
        # shard id to the driver (for progress), not the images
        self.keep_images = keep_images
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
        return batch if self.keep_images else {"shard": batch["shard"]}

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
