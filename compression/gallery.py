"""A compress run's gallery: each trial keeps its scored test captions (a small Parquet beside
its record), and at the end of the run OUT/gallery.html shows a sample of the test images with
every trial's caption side by side (model.gallery renders it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfleet.model.artifacts import write_parquet_atomic
from capfleet.model.data import ImageRecord
from capfleet.model.gallery import GALLERY_FILE, check_gallery_size, sample_ids, write_gallery
from capfleet.model.text import clean_caption

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


def write_compress_gallery(
    out: str | Path,
    trials: Sequence[tuple[str, dict, Path]],
    images: int,
    title: str = "capfleet compress: every trial's captions",
) -> Path | None:
    """OUT/gallery.html for up to `images` test images (sample_ids) with every trial's
    caption. trials: (column name, the trial's record, its captions Parquet). A failed trial's
    column shows its error; a trial without captions (recorded by an older capfleet) is left
    out. Returns the page's path, or None when `images` is 0 or no trial has captions."""
    check_gallery_size(images)
    if not images:
        return None
    kept = {}
    for name, record, path in trials:
        if record.get("status") != "ok":
            kept[name] = None
        elif Path(path).is_file():
            kept[name] = pq.read_table(path, schema=TRIAL_CAPTIONS_SCHEMA).to_pylist()
    tables = {n: rows for n, rows in kept.items() if rows is not None}
    if not tables:
        return None
    ids = sample_ids((r["image_id"] for rows in tables.values() for r in rows), images)
    wanted = set(ids)
    items = {i: {"image_id": i, "image": None, "references": [], "captions": {}} for i in ids}
    for name, rows in kept.items():
        if rows is None:
            error = next(r for n, r, _ in trials if n == name).get("error") or "trial failed"
            for item in items.values():
                item["captions"][name] = {
                    "caption": None,
                    "status": "error",
                    "error": f"trial failed: {error.splitlines()[0]}",
                }
            continue
        for r in rows:
            if r["image_id"] not in wanted:
                continue
            item = items[r["image_id"]]
            item["image"] = item["image"] or r["uri"]
            item["references"] = item["references"] or r["references"]
            item["captions"][name] = {
                "caption": r["caption"],
                "status": "ok",
                "error": None,
                "scores": {k: r[k] for k in ("cider_d", "rouge_l", "sentence_bleu4")},
            }
    return write_gallery(Path(out) / GALLERY_FILE, [items[i] for i in ids], list(kept), title)
