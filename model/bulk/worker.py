"""The caption worker: hosts one bundle and turns a decoded shard into its Parquet part."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pyarrow as pa

from capfleet.model.bulk.schema import CAPTION_SCHEMA, ERROR, OK
from capfleet.model.bulk.stats import PartStats, reason
from capfleet.model.bulk.writer import part_done, part_path, write_part
from capfleet.model.bundle import BundleRunner
from capfleet.model.text import clean_caption


class CaptionWorker:
    """Hosts one bundle; `__call__` captions one shard and writes its Parquet part.

    Follows Ray's batch-inference shape (load once in __init__, map a batch in __call__) and
    holds no Ray code. A shard whose part is already whole is passed over (resume).
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
        # shard id and its row count to the driver (for progress), not the images
        self.keep_images = keep_images
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        shard = int(batch["shard"][0])
        path = part_path(self.out, self.name, shard)
        rows = len(batch["image_id"][0])
        if not part_done(path):
            table, stats = self.caption_shard(shard, batch)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_part(path, table, stats)
        if self.keep_images:
            return batch
        return {"shard": batch["shard"], "rows": np.array([rows])}

    def caption_shard(self, shard: int, batch: dict) -> tuple[pa.Table, PartStats]:
        """Caption a decoded shard's good images in batches; bad ones become error rows."""
        started = time.time()
        ids = [str(i) for i in batch["image_id"][0]]
        errors = [str(e) for e in batch["error"][0]]
        refs = [[str(c) for c in r] for r in batch["references"][0]]
        images = batch[f"image_{self.runner.input_size}"][0]
        n = len(ids)
        captions: list[str | None] = [None] * n
        enc_ms, dec_ms, bsizes = [None] * n, [None] * n, [None] * n
        good = [i for i in range(n) if not errors[i]]
        for start in range(0, len(good), self.batch_size):
            idx = good[start : start + self.batch_size]
            caps, enc_s, dec_s = self.runner.caption_timed(images[idx])
            for i, c in zip(idx, caps, strict=True):
                captions[i] = c
                enc_ms[i], dec_ms[i] = 1000 * enc_s / len(idx), 1000 * dec_s / len(idx)
                bsizes[i] = len(idx)
        read_ms = [float(v) for v in batch["read_ms"][0]]
        decode_ms = [float(v) for v in batch["decode_ms"][0]]
        latency = [None if e is None else e + d for e, d in zip(enc_ms, dec_ms, strict=True)]
        table = pa.table(
            {
                "image_id": ids,
                "uri": [str(u) for u in batch["uri"][0]],
                "model": [self.name] * n,
                "caption": captions,
                "status": [ERROR if e else OK for e in errors],
                "error": [e or None for e in errors],
                "references": refs,
                "latency_ms": latency,
                "read_ms": [None if e else v for e, v in zip(errors, read_ms, strict=True)],
                "decode_ms": [None if e else v for e, v in zip(errors, decode_ms, strict=True)],
                "encoder_ms": enc_ms,
                "decoder_ms": dec_ms,
                "batch_size": bsizes,
                "worker": [self.worker] * n,
                "shard": [shard] * n,
            },
            schema=CAPTION_SCHEMA,
        )
        stats = PartStats(rows=n, ok=len(good), started=started)
        for e in errors:
            if e:
                stats.errors[reason(e)] = stats.errors.get(reason(e), 0) + 1
        for i in good:
            stats.latency_ms += latency[i]
            stats.read_ms += read_ms[i]
            stats.decode_ms += decode_ms[i]
            stats.encoder_ms += enc_ms[i]
            stats.decoder_ms += dec_ms[i]
            if refs[i]:
                stats.bleu.add([clean_caption(r) for r in refs[i]], captions[i])
        stats.finished = time.time()
        return table, stats
