"""The caption worker: hosts every bundle of a job and turns a shard into each model's Parquet
part."""

from __future__ import annotations

import contextlib
import os
import socket
import time

import pyarrow as pa

from capfleet.cluster.watchdog import WorkerFailure, deadline
from capfleet.core.storage import read_parquet
from capfleet.jobs.caption.load import decode_phase, fetch_phase
from capfleet.jobs.caption.parts import (
    CAPTION_SCHEMA,
    ERROR,
    OK,
    part_path,
    part_stats,
    stats_of,
    write_part,
)
from capfleet.model.bundle import BundleRunner, bundle_here
from capfleet.model.metrics import rouge_l, sentence_bleu4
from capfleet.model.text import clean_caption


class CaptionWorker:
    """Hosts every bundle of a job ({name: bundle directory}); `__call__` captions one shard
    with each model in turn and writes each model's Parquet part.

    One pool of these, each actor holding every model, keeps every CPU busy whatever the
    models' relative speeds (a pool per model would leave the fast model's actors waiting on
    the slow one's) and decodes each shard once. Follows Ray's batch-inference shape (load
    once in __init__, map a shard in __call__) and holds no Ray code: cluster/pool.py runs it
    and counts each shard's tries. A model whose part of the shard is already whole is passed
    over (resume); with `repair`, its error rows among the shard's rows are captioned again
    and replaced in the part, its ok rows untouched. `__call__` runs one shard at a time
    (the pool's computes take turns; `fetch` may run beside it): each shard is decoded into
    the arrays the one before used.
    """

    def __init__(
        self,
        bundles: dict[str, str],
        out: str,
        batch_size: int = 64,
        num_threads: int = 1,
        beam_width: int = 1,
        shard_timeout_s: float = 0.0,
        repair: bool = False,
        decode: dict | None = None,
    ):
        if not bundles:
            raise ValueError("CaptionWorker needs at least one bundle")
        # each bundle where this node sees it, or fetched to it (bundle_here): {name: source}
        self.runners = {
            name: BundleRunner(
                bundle_here(**source), num_threads=num_threads, beam_width=beam_width
            )
            for name, source in bundles.items()
        }
        self.out = out
        self.batch_size = batch_size
        self.shard_timeout_s = shard_timeout_s  # 0 = none; for each model's work on a shard
        self.repair = repair
        # load_shard's arguments when this worker fetches and decodes its shards itself (the
        # default: one process per core reads, decodes and captions)
        self.decode = decode
        self.pixels: dict = {}  # the arrays each shard is decoded into (load.decode_phase)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def fetch(self, item: dict) -> dict:
        """A shard's bytes (load.fetch_phase): the pool runs this while the actor captions the
        shard before (Pool.overlap), so a slow disk, store or host costs no captioning time.
        Only when this worker decodes its shards itself (`decode`)."""
        d = self.decode
        return fetch_phase(item, d["max_bytes"], d["policy"], self.out, self.shard_timeout_s)

    def __call__(self, item: dict) -> dict:
        """One shard's item (listing.Shard.item, fetched or not, or load_shard's result): every
        model's part written; returns only the shard id and its row count (for the driver's
        progress)."""
        shard = int(item["shard"])
        if self.decode is not None:
            if "data" not in item:  # not fetched yet (a direct call)
                item = self.fetch(item)
            d = self.decode
            item = decode_phase(
                item, d["sizes"], d.get("thumbs"), self.out, self.shard_timeout_s, self.pixels
            )
        rows = len(item["image_id"])
        for name in self.runners:
            timer = (
                deadline(self.out, shard, name, self.shard_timeout_s)
                if self.shard_timeout_s
                else contextlib.nullcontext()
            )
            try:
                with timer:
                    self._write(shard, item, name)
            except Exception as e:  # a bug, not a bad image: noted, so the rows say what it was
                raise WorkerFailure(f"{name}: {type(e).__name__}: {e}") from e
        return {"shard": shard, "rows": rows}

    def _write(self, shard: int, item: dict, name: str) -> None:
        path = part_path(self.out, name, shard)
        stats = part_stats(path)
        started = time.time()
        repaired = None
        if stats is None or stats.retry:  # not done: the batch holds the whole shard
            table = self.caption_rows(shard, item, list(range(len(item["image_id"]))), name)
        elif self.repair:
            old = read_parquet(path).replace_schema_metadata(None).to_pylist()
            positions = [int(r) for r in item["rows"]]
            redo = [j for j, pos in enumerate(positions) if old[pos]["status"] != OK]
            if not redo:
                return
            new = self.caption_rows(shard, item, redo, name).to_pylist()
            for j, row in zip(redo, new, strict=True):
                old[positions[j]] = row
            table = pa.Table.from_pylist(old, schema=CAPTION_SCHEMA)
            repaired = sum(row["status"] == OK for row in new)
        else:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        stats = stats_of(table, started, time.time())
        if repaired is not None:  # its throughput counts only what this run captioned
            stats.captioned = repaired
        write_part(path, table, stats)

    def caption_rows(self, shard: int, item: dict, idx: list[int], name: str) -> pa.Table:
        """Rows `idx` of a loaded shard captioned by model `name`, in batches; bad images
        become error rows."""
        runner = self.runners[name]
        pick = lambda key: [item[key][j] for j in idx]  # noqa: E731
        errors = [str(e) for e in pick("error")]
        images = item[f"image_{runner.input_size}"]
        n = len(idx)
        captions, enc_ms, dec_ms, bsizes = caption_good(
            runner, lambda rows: rows_of(images, [idx[k] for k in rows]), errors, self.batch_size
        )
        read_ms = [float(v) for v in pick("read_ms")]
        decode_ms = [float(v) for v in pick("decode_ms")]
        latency = [None if e is None else e + d for e, d in zip(enc_ms, dec_ms, strict=True)]
        refs = [[str(c) for c in r] for r in pick("references")]
        rouge, bleu = per_image_scores(refs, captions)
        return pa.table(
            {
                "image_id": [str(i) for i in pick("image_id")],
                "uri": [str(u) for u in pick("uri")],
                "model": [name] * n,
                "caption": captions,
                "status": [ERROR if e else OK for e in errors],
                "error": [e or None for e in errors],
                "references": refs,
                "rouge_l": rouge,
                "sentence_bleu4": bleu,
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


def rows_of(images, rows: list[int]):
    """images[rows]: a view when the rows run on without a gap (a shard with no error rows),
    else a copy."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return images[rows[0] : rows[-1] + 1]
    return images[rows]


def caption_good(
    runner: BundleRunner, images, errors: list[str], batch_size: int
) -> tuple[list, list, list, list]:
    """Captions of the rows without an error, `batch_size` rows per call (`images(rows)`
    gives their pixels); per row: caption, its share of its call's encoder and decoder
    milliseconds, and that call's size (None for an error row)."""
    n = len(errors)
    captions, enc_ms, dec_ms, sizes = [None] * n, [None] * n, [None] * n, [None] * n
    good = [k for k in range(n) if not errors[k]]
    for start in range(0, len(good), batch_size):
        chunk = good[start : start + batch_size]
        caps, enc_s, dec_s = runner.caption_timed(images(chunk))
        for k, c in zip(chunk, caps, strict=True):
            captions[k] = c
            enc_ms[k], dec_ms[k] = 1000 * enc_s / len(chunk), 1000 * dec_s / len(chunk)
            sizes[k] = len(chunk)
    return captions, enc_ms, dec_ms, sizes


def per_image_scores(refs: list[list[str]], captions: list) -> tuple[list, list]:
    """ROUGE-L and smoothed sentence BLEU-4 of each captioned row that has references (None
    elsewhere): scores that need no other image, so a worker computes them shard by shard."""
    rouge, bleu = [None] * len(captions), [None] * len(captions)
    idx = [i for i, (r, c) in enumerate(zip(refs, captions, strict=True)) if r and c is not None]
    if idx:
        cleaned = [[clean_caption(x) for x in refs[i]] for i in idx]
        _, each = rouge_l(cleaned, [captions[i] for i in idx])
        for i, score, r in zip(idx, each, cleaned, strict=True):
            rouge[i] = score
            bleu[i] = sentence_bleu4(r, captions[i])
    return rouge, bleu
