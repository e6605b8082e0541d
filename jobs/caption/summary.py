"""The caption job's summary: one row per model, from the parts' statistics (their footers) and
the latency columns alone, so that a million-row job's summary holds no list of its rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from capfleet.core.storage import read_parquet
from capfleet.jobs.caption.parts import SUMMARY_SCHEMA, merge, part_stats, parts, read_captions
from capfleet.model.bundle import read_manifest
from capfleet.model.metrics import cider_d
from capfleet.model.text import clean_caption

# CIDEr-D needs every scored image's n-grams at once (its IDF is the set's), so the driver
# computes it from the parts' captions and references; above this many scored images it is
# left out (null) rather than held in the driver's memory. Every other figure merges.
CIDER_MAX_IMAGES = 200_000


def summarize(
    out: str | Path, bundles: dict[str, str], run_started: float, keep: set[str] = frozenset()
) -> tuple[pa.Table, dict]:
    """One row per model of `bundles` ({name: bundle directory}), and per model the latencies
    and the per-image CIDEr-D of the image ids in `keep` (for the gallery). Throughput counts
    the parts this run wrote (begun after `run_started`, Unix time) over this model's own time
    from its first part begun to its last finished; null when a rerun had nothing to do."""
    rows, extras = [], {}
    for name, bundle in bundles.items():
        found = [(p, part_stats(p)) for p in parts(out, name)]
        found = [(p, s) for p, s in found if s is not None]
        total = merge(s for _, s in found)
        this_run = merge(s for _, s in found if s.started >= run_started and not s.retry)
        latency = call_latencies([p for p, _ in found])
        cider, cider_each = (
            _cider(out, name, keep) if 0 < total.bleu.scored <= CIDER_MAX_IMAGES else (None, {})
        )
        extras[name] = {"latency_ms": latency, "cider_d": cider_each}
        manifest = read_manifest(bundle, verify=False)
        span = this_run.finished - this_run.started
        means = {
            k: getattr(total, k) / total.ok if total.ok else None
            for k in ("read_ms", "decode_ms", "encoder_ms", "decoder_ms")
        }
        means["e2e_ms"] = sum(means.values()) if total.ok else None
        rows.append(
            {
                "model": name,
                "images": total.rows,
                "ok": total.ok,
                "failed": total.rows - total.ok,
                "errors": json.dumps(dict(sorted(total.errors.items()))),
                # images captioned by this run (not repaired parts' untouched rows, not errors)
                "throughput_img_s": this_run.captioned / span
                if this_run.captioned and span > 0
                else None,
                "actor_img_s": this_run.captioned / this_run.busy_s
                if this_run.captioned and this_run.busy_s > 0
                else None,
                "latency_p50_ms": float(np.percentile(latency, 50)) if len(latency) else None,
                "latency_p95_ms": float(np.percentile(latency, 95)) if len(latency) else None,
                **means,
                "size_mb": manifest.get("size_mb"),
                "gzip_size_mb": manifest.get("gzip_size_mb"),
                "scored": total.bleu.scored,
                **total.bleu.scores(),
                "cider_d": cider,
                "rouge_l": total.rouge_l / total.bleu.scored if total.bleu.scored else None,
            }
        )
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA), extras


def _cider(out, model: str, keep: set[str]) -> tuple[float, dict[str, float]]:
    """CIDEr-D of a model's scored rows (ok, with references), and the per-image score of the
    ids in `keep`."""
    import pyarrow.compute as pc

    t = read_captions(out, model, columns=["image_id", "status", "caption", "references"])
    t = t.filter(
        pc.and_(pc.equal(t["status"], "ok"), pc.greater(pc.list_value_length(t["references"]), 0))
    )
    refs = [[clean_caption(r) for r in rs] for rs in t.column("references").to_pylist()]
    mean, each = cider_d(refs, t.column("caption").to_pylist())
    ids = t.column("image_id").to_pylist()
    return mean, {i: s for i, s in zip(ids, each, strict=True) if i in keep}


def call_latencies(paths: list[Path]) -> np.ndarray:
    """Per model call (a batch), its encoder + decoder milliseconds per image: what was
    measured. A row's latency_ms is its call's figure, shared by every image of the call, so
    the call is counted once (its rows' distinct latency_ms and batch_size within a part)
    rather than once per image, which would weigh a figure by its batch's size."""
    values = []
    for p in paths:
        t = read_parquet(p, columns=["latency_ms", "batch_size"]).drop_null()
        if t.num_rows:
            pairs = np.stack(
                [t.column(0).to_numpy(), t.column(1).to_numpy().astype(np.float64)], axis=1
            )
            values.append(np.unique(pairs, axis=0)[:, 0])
    return np.concatenate(values) if values else np.zeros(0)
