"""What a person looks at after a caption job: OUT/gallery.html (a sample of the images with
every model's caption side by side, the references and the per-image scores) and
OUT/latency.png (each model's latency distribution)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfleet.model.bulk.fetch import read_uri
from capfleet.model.bulk.reader import Listing
from capfleet.model.bulk.writer import part_path, part_stats
from capfleet.model.gallery import GALLERY_FILE, gallery_items, sample_ids, write_gallery
from capfleet.model.reports import plot_latency

LATENCY_PLOT = "latency.png"


def gallery_sample(listing: Listing, images: int) -> list[str]:
    """The image ids the gallery shows: a deterministic sample (the same for the same set)."""
    return sample_ids((i for s in listing.shards for i in s.image_id), images) if images else []


def write_reports(out: Path, listing: Listing, models: list[str], sample: list[str], extras: dict):
    """gallery.html for the sampled ids (0 of them: none; an earlier run's page is removed) and
    latency.png. Returns the paths written."""
    written = []
    latencies = {m: extras[m]["latency_ms"] for m in models if len(extras[m]["latency_ms"])}
    if latencies:
        written.append(plot_latency(latencies, out / LATENCY_PLOT, "caption latency per image"))
    page = out / GALLERY_FILE
    if not sample:
        page.unlink(missing_ok=True)
        return written
    wanted = set(sample)
    where = {i: s.shard for s in listing.shards for i in s.image_id if i in wanted}
    rows = []
    for model in models:
        for shard in sorted(set(where.values())):
            path = part_path(out, model, shard)
            if part_stats(path) is None:
                continue
            t = pq.read_table(path).replace_schema_metadata(None)
            t = t.filter(pc.is_in(t["image_id"], pa.array(sorted(wanted))))
            for r in t.to_pylist():
                r["cider_d"] = extras[model]["cider_d"].get(r["image_id"])
                rows.append(r)
    images = {}
    for r in rows:  # thumbnails of images that a path or URI names (not tar or Parquet cells)
        if r["image_id"] not in images and "#" not in r["uri"]:
            data = read_uri(r["uri"])
            images[r["image_id"]] = data if isinstance(data, bytes) else None
    items = gallery_items(rows, images={k: v for k, v in images.items() if v})
    written.append(
        write_gallery(page, items, models, title=f"captions of {len(items)} sampled images")
    )
    return written
