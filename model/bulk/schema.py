"""The caption job's output schemas, declared once; every writer and reader uses them."""

import pyarrow as pa

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
