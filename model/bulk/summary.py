"""The caption job's summary: one row per model from the parts written."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from capfleet.model.bulk.schema import OK, SUMMARY_SCHEMA
from capfleet.model.bulk.writer import read_captions
from capfleet.model.bundle import read_manifest
from capfleet.model.data import ImageRecord
from capfleet.model.metrics import corpus_bleu_scores
from capfleet.model.text import clean_caption


def summarize(
    out: str | Path,
    bundles: dict[str, str],
    records: Sequence[ImageRecord],
    wall_s: float,
    images_run: int,
) -> pa.Table:
    """One row per model of `bundles` ({name: bundle directory}) from the Parquet written, with
    BLEU where references exist.

    Throughput is the images captioned by this run over its wall time (null when a rerun had
    nothing left to do)."""
    refs = {r.image_id: [clean_caption(c) for c in r.captions] for r in records if r.captions}
    rows = []
    for name, bundle in bundles.items():
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
