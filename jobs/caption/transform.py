"""CaptionTransform: capfleet's captioner as a step of a user's own Ray Data pipeline.

    import ray, capfleet
    ds = ray.data.read_parquet("s3://bucket/images.parquet")          # a column of image bytes
    ds = ds.map_batches(
        capfleet.CaptionTransform,
        fn_constructor_kwargs={"bundle": "/shared/bundles/int8"},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=8),
        num_cpus=1,
        batch_size=256,
    )
    ds.write_parquet("s3://bucket/captions/")

No Ray code here: it is Ray's batch-inference shape (load once in __init__, map a batch in
__call__), so a test or a script calls it on a plain dict of columns too.
"""

from __future__ import annotations

import time

import numpy as np

from capfleet.core.errors import CapfleetError
from capfleet.jobs.caption.fetch import MAX_IMAGE_BYTES, image_bytes
from capfleet.jobs.caption.parts import ERROR, OK
from capfleet.jobs.caption.worker import caption_good
from capfleet.model.bundle import BundleRunner
from capfleet.model.images import ImageError, decode_image

INPUT_COLUMNS = ("bytes", "image")  # looked for in this order when no column is named
OUTPUT_COLUMNS = (
    "caption",
    "status",
    "error",
    "decode_ms",
    "encoder_ms",
    "decoder_ms",
    "latency_ms",
)


class CaptionTransform:
    """Adds caption, status ("ok"/"error"), error, and per-row decode, encoder, decoder and
    latency milliseconds to a batch whose `column` holds encoded image bytes (raw, or the
    Hugging Face {bytes, path} struct) or decoded RGB arrays (H, W, 3) uint8 of any size. A bad
    image is an error row; the batch is never dropped."""

    def __init__(
        self,
        bundle: str,
        column: str = "",
        num_threads: int = 1,
        beam_width: int = 1,
        max_bytes: int = MAX_IMAGE_BYTES,
    ):
        self.runner = BundleRunner(bundle, num_threads=num_threads, beam_width=beam_width)
        self.column = column
        self.max_bytes = max_bytes

    def _input(self, batch: dict) -> str:
        if self.column:
            if self.column not in batch:
                raise CapfleetError(
                    f"CaptionTransform: no column {self.column!r} in {sorted(batch)}"
                )
            return self.column
        found = next((c for c in INPUT_COLUMNS if c in batch), None)
        if found is None:
            raise CapfleetError(
                f"CaptionTransform: the batch has none of {', '.join(INPUT_COLUMNS)} "
                f"(columns: {', '.join(sorted(batch))}); pass column=..."
            )
        return found

    def _decode(self, value) -> tuple[np.ndarray | ImageError, float]:
        t0 = time.perf_counter()
        size = self.runner.image_size
        if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
            from PIL import Image

            img = Image.fromarray(value[..., :3]).convert("RGB").resize(size[::-1], Image.BILINEAR)
            out: np.ndarray | ImageError = np.asarray(img, np.uint8)
        else:
            data = image_bytes(value, self.max_bytes)
            out = data if isinstance(data, ImageError) else decode_image(data, size)
        return out, 1000 * (time.perf_counter() - t0)

    def __call__(self, batch: dict) -> dict:
        values = batch[self._input(batch)]
        n = len(values)
        decoded = [self._decode(v) for v in values]
        errors = [str(d) if isinstance(d, ImageError) else "" for d, _ in decoded]
        captions, enc_ms, dec_ms, _ = caption_good(  # the whole batch in one call
            self.runner, lambda rows: np.stack([decoded[i][0] for i in rows]), errors, max(n, 1)
        )
        enc = np.array([np.nan if v is None else v for v in enc_ms], np.float64)
        dec = np.array([np.nan if v is None else v for v in dec_ms], np.float64)
        out = dict(batch)
        out["caption"] = np.array(captions, dtype=object)
        out["status"] = np.array([ERROR if e else OK for e in errors], dtype=object)
        out["error"] = np.array([e or None for e in errors], dtype=object)
        out["decode_ms"] = np.array([ms for _, ms in decoded], np.float64)
        out["encoder_ms"], out["decoder_ms"], out["latency_ms"] = enc, dec, enc + dec
        return out
