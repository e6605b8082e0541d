"""A compress run's records, the schemas written once: trial records -> trials.parquet (deltas
against each model's fp32 baseline), the Pareto front, and each trial's scored test captions (a
small Parquet beside its record). The report and the gallery read them (jobs/compress/).

Sizes are raw bundle bytes unless a column says gzip; a gzip saving is never a speed-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from capfleet.core.artifacts import write_parquet_atomic
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import place, read_parquet
from capfleet.model.data import ImageRecord
from capfleet.model.text import clean_caption

TRIALS_FILE = "trials.parquet"
BASELINE = "fp32:fp32"

# One row per (model, trial). Deltas are against the same model's fp32:fp32 trial.
TRIAL_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("trial", pa.string()),  # "ENCODER:DECODER" recipes, e.g. "int8:qat-int8"
        ("encoder_recipe", pa.string()),
        ("decoder_recipe", pa.string()),
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),
        ("bundle", pa.string()),
        ("size_mb", pa.float64()),  # raw bytes of the bundle's files, decimal MB
        ("gzip_mb", pa.float64()),
        ("encoder_mb", pa.float64()),
        ("encoder_gzip_mb", pa.float64()),
        ("decoder_mb", pa.float64()),
        ("decoder_gzip_mb", pa.float64()),
        ("encoder_sparsity", pa.float64()),  # share of zero kernel weights
        ("decoder_sparsity", pa.float64()),
        ("encoder_ms", pa.float64()),  # per image, at bench_batch with bench_threads
        ("decoder_ms", pa.float64()),  # greedy decoding, per image
        ("e2e_ms", pa.float64()),  # encoder + decoder together, per image
        ("bench_batch", pa.int32()),
        ("bench_threads", pa.int32()),
        ("bleu1", pa.float64()),  # the bundle's own captions of the test split
        ("bleu2", pa.float64()),
        ("bleu3", pa.float64()),
        ("bleu4", pa.float64()),
        ("cider_d", pa.float64()),  # IDF from the test images' references (one image set)
        ("rouge_l", pa.float64()),
        ("content_accuracy", pa.float64()),  # shapes data only
        ("test_images", pa.int64()),
        # the same bundle's scores on the dev split: what a goal decides on (test: reported)
        ("dev_bleu4", pa.float64()),
        ("dev_cider_d", pa.float64()),  # IDF from the dev images' references
        ("dev_images", pa.int64()),
        ("size_ratio", pa.float64()),  # size_mb / baseline size_mb
        ("gzip_ratio", pa.float64()),
        ("speedup", pa.float64()),  # baseline e2e_ms / e2e_ms
        ("delta_bleu4", pa.float64()),  # bleu4 - baseline bleu4
        ("delta_cider_d", pa.float64()),
        ("delta_rouge_l", pa.float64()),
        ("wall_s", pa.float64()),  # the trial's own wall time (tuning, converting, scoring)
        ("started", pa.float64()),  # Unix time the trial's task began and ended
        ("finished", pa.float64()),
    ]
)


def failed_record(model: str, trial: str, error: str) -> dict:
    return {"model": model, "trial": trial, "status": "error", "error": error}


def with_deltas(records: Sequence[dict]) -> list[dict]:
    """Records with every schema column, deltas filled against their model's baseline."""
    base = {r["model"]: r for r in records if r["trial"] == BASELINE and r["status"] == "ok"}
    out = []
    for r in records:
        row = {name: r.get(name) for name in TRIAL_SCHEMA.names}
        b = base.get(r["model"])
        if b and r["status"] == "ok":
            row["size_ratio"] = r["size_mb"] / b["size_mb"]
            row["gzip_ratio"] = r["gzip_mb"] / b["gzip_mb"]
            row["speedup"] = b["e2e_ms"] / r["e2e_ms"] if r["e2e_ms"] else None
            for m in ("bleu4", "cider_d", "rouge_l"):
                mine, theirs = r.get(m), b.get(m)
                row[f"delta_{m}"] = None if mine is None or theirs is None else mine - theirs
        out.append(row)
    return out


def write_trials(out: str | Path, records: Sequence[dict]) -> pa.Table:
    table = pa.Table.from_pylist(with_deltas(records), schema=TRIAL_SCHEMA)
    write_parquet_atomic(place(out) / TRIALS_FILE, table)
    return table


def read_trials(out: str | Path) -> list[dict]:
    p = place(out) / TRIALS_FILE
    if not p.is_file():
        raise CapfleetError(f"{out}: no {TRIALS_FILE} (run `capfleet compress` into it first)")
    return read_parquet(p).to_pylist()


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower x (cost) and higher y (BLEU)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def minutes_per_2000(ms_per_image: float) -> float:
    return ms_per_image * 2000 / 60000


def label(r: dict) -> str:
    """ "int8" for "int8:int8"; the full "ENCODER:DECODER" where the parts differ."""
    enc, _, dec = r["trial"].partition(":")
    return enc if enc == dec else r["trial"]


# One row per test image a trial captioned; scores are that image's, within the trial's test
# images (model.metrics.PER_IMAGE_METRICS).
TRIAL_CAPTIONS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("caption", pa.string()),
        ("references", pa.list_(pa.string())),  # cleaned, as scored
        ("cider_d", pa.float64()),
        ("rouge_l", pa.float64()),
        ("sentence_bleu4", pa.float64()),
    ]
)


def write_trial_captions(
    path: str | Path,
    records: Sequence[ImageRecord],
    captions: Sequence[str],
    per_image: dict[str, list[float]],
) -> None:
    """A trial's scored captions of its test images, in TRIAL_CAPTIONS_SCHEMA."""
    rows = [
        {
            "image_id": r.image_id,
            "uri": r.uri,
            "caption": c,
            "references": [clean_caption(x) for x in r.captions],
            **{k: per_image[k][i] for k in ("cider_d", "rouge_l", "sentence_bleu4")},
        }
        for i, (r, c) in enumerate(zip(records, captions, strict=True))
    ]
    write_parquet_atomic(path, pa.Table.from_pylist(rows, schema=TRIAL_CAPTIONS_SCHEMA))


SENSITIVITY_FILE = "sensitivity.parquet"
# One row per (trial with a mixed part, part, op): the part's error when that op alone is int8
# and the rest float, on the calibration samples; rank 1 is the worst. For the few worst, the
# whole model's dev scores with that op alone int8, against all float.
SENSITIVITY_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("trial", pa.string()),
        ("part", pa.string()),  # encoder | decoder
        ("rank", pa.int32()),
        ("layer", pa.string()),  # the Keras layer the op comes from
        ("node", pa.string()),  # the op's own name
        ("op", pa.string()),  # TFLite's op, e.g. CONV_2D
        ("precision", pa.string()),  # what was tried alone: int8
        ("snr_db", pa.float64()),  # the part's outputs against float; null: no error at all
        ("cosine", pa.float64()),
        ("kept", pa.bool_()),  # the mixed bundle keeps this op out of int8...
        ("kept_as", pa.string()),  # ...in this precision (float32 | int16x8); null: not kept
        ("dev_bleu4_delta", pa.float64()),  # whole model, dev split; null: not measured
        ("dev_cider_d_delta", pa.float64()),
    ]
)


def sensitivity_rows(record: dict, manifest: dict) -> list[dict]:
    """The sensitivity rows of a built trial, from its bundle's manifest (none without a
    mixed part)."""
    rows = []
    for part, section in (manifest.get("layers") or {}).items():
        kept = set(section.get("kept", section.get("kept_float", ())))  # older: kept float
        for r in section.get("sensitivity", ()):
            rows.append(
                {
                    "model": record["model"],
                    "trial": record["trial"],
                    "part": part,
                    "rank": r["rank"],
                    "layer": r["layer"],
                    "node": r["node"],
                    "op": r["op"],
                    "precision": "int8",
                    "snr_db": r["snr_db"],
                    "cosine": r["cosine"],
                    "kept": r["node"] in kept,
                    "kept_as": section.get("fallback", "float32") if r["node"] in kept else None,
                    "dev_bleu4_delta": r.get("dev_bleu4_delta"),
                    "dev_cider_d_delta": r.get("dev_cider_d_delta"),
                }
            )
    return rows


def write_sensitivity(out: str | Path, rows: Sequence[dict]) -> Path | None:
    """OUT/sensitivity.parquet, or none (an earlier run's removed) when no trial has rows."""
    path = place(out) / SENSITIVITY_FILE
    if not rows:
        path.unlink(missing_ok=True)
        return None
    write_parquet_atomic(path, pa.Table.from_pylist(list(rows), schema=SENSITIVITY_SCHEMA))
    return path
