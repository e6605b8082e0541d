"""The caption job's output schemas, declared once; every writer and reader uses them."""

import pyarrow as pa

# One row per (image, model).
CAPTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("model", pa.string()),
        ("caption", pa.string()),  # null when status is "error"
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),  # reason, e.g. "truncated: image file is truncated"; null when ok
        ("references", pa.list_(pa.string())),  # the image's reference captions (empty: none)
        ("rouge_l", pa.float64()),  # per-image scores against the references; null without
        ("sentence_bleu4", pa.float64()),  # (smoothed: nltk's method1)
        ("latency_ms", pa.float64()),  # encoder_ms + decoder_ms
        ("read_ms", pa.float64()),  # fetching the bytes (a tar's or row group's share)
        ("decode_ms", pa.float64()),  # decoding and resizing for every input size
        ("encoder_ms", pa.float64()),  # the batch's encoder time divided by its size
        ("decoder_ms", pa.float64()),  # the batch's decoding time divided by its size
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
        ("errors", pa.string()),  # JSON {reason: count} of the failed rows
        ("throughput_img_s", pa.float64()),  # this model's images this run / its own wall time
        ("actor_img_s", pa.float64()),  # images per second of one busy actor (this run)
        ("latency_p50_ms", pa.float64()),
        ("latency_p95_ms", pa.float64()),
        ("read_ms", pa.float64()),  # means per ok image
        ("decode_ms", pa.float64()),
        ("encoder_ms", pa.float64()),
        ("decoder_ms", pa.float64()),
        ("size_mb", pa.float64()),
        ("gzip_size_mb", pa.float64()),
        ("scored", pa.int64()),  # ok images with references, which the scores are computed on
        ("bleu1", pa.float64()),  # null without references
        ("bleu2", pa.float64()),
        ("bleu3", pa.float64()),
        ("bleu4", pa.float64()),
        # CIDEr-D's IDF is that of this job's scored images: compare models on one image set;
        # null without references, or above CIDER_MAX_IMAGES scored images (see summary.py)
        ("cider_d", pa.float64()),
        ("rouge_l", pa.float64()),  # the mean of the rows' rouge_l
    ]
)

OK, ERROR = "ok", "error"
STATS_KEY = b"capfleet.stats"  # a part's PartStats, JSON, in its Parquet footer
