"""What a person looks at after a caption job: OUT/gallery.html (a sample of the images with
every model's caption side by side, the references and the per-image scores) and
OUT/latency.png (each model's latency distribution)."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from capfleet.core.storage import read_parquet
from capfleet.jobs.caption.fetch import read_uri
from capfleet.jobs.caption.listing import Listing
from capfleet.jobs.caption.load import THUMBS_DIR, thumbnail_path
from capfleet.jobs.caption.parts import part_path, part_stats
from capfleet.jobs.caption.web import DEFAULT_POLICY, UrlPolicy
from capfleet.jobs.gallery import GALLERY_FILE, gallery_items, sample_ids, write_gallery
from capfleet.jobs.plots import plot_latency

LATENCY_PLOT = "latency.png"
# Thumbnails are a courtesy at the end of a job whose captions are already written: one try of a
# few seconds per image and a budget for them all, so a dead or slow host cannot hold the job
# for minutes. An image that failed in the job is not fetched again.
THUMBNAIL_TIMEOUT_S = 5.0
THUMBNAILS_BUDGET_S = 30.0


def gallery_sample(listing: Listing, images: int) -> list[str]:
    """The image ids the gallery shows: a deterministic sample (the same for the same set)."""
    return sample_ids((i for s in listing.shards for i in s.image_id), images) if images else []


def write_reports(
    out: Path,
    listing: Listing,
    models: list[str],
    sample: list[str],
    extras: dict,
    policy: UrlPolicy = DEFAULT_POLICY,
):
    """gallery.html for the sampled ids (0 of them: none; an earlier run's page is removed) and
    latency.png; thumbnails are fetched under the job's URL policy. Returns the paths written."""
    written = []
    latencies = {m: extras[m]["latency_ms"] for m in models if len(extras[m]["latency_ms"])}
    if latencies:
        written.append(
            plot_latency(
                latencies, out / LATENCY_PLOT, "model time per image, per call", "model calls"
            )
        )
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
            t = read_parquet(path).replace_schema_metadata(None)
            t = t.filter(pc.is_in(t["image_id"], pa.array(sorted(wanted))))
            for r in t.to_pylist():
                r["cider_d"] = extras[model]["cider_d"].get(r["image_id"])
                rows.append(r)
    items = gallery_items(rows, images=_thumbnail_bytes(out, rows, policy))
    written.append(
        write_gallery(page, items, models, title=f"captions of {len(items)} sampled images")
    )
    return written


def _thumbnail_bytes(out: Path, rows: list[dict], policy: UrlPolicy) -> dict[str, bytes | None]:
    """{image_id: the image's bytes, or None where none is shown}: the thumbnail the job kept
    as it read the image (load.keep_thumbnail), else read once per image that a path or URI
    names (not tar members or Parquet cells) and that some model captioned."""
    captioned = {r["image_id"] for r in rows if r["status"] == "ok"}
    images: dict[str, bytes | None] = {}
    deadline = time.monotonic() + THUMBNAILS_BUDGET_S
    for r in rows:
        image_id = r["image_id"]
        if image_id in images:
            continue
        images[image_id] = None
        if image_id not in captioned:
            continue
        kept = thumbnail_path(out / THUMBS_DIR, image_id)
        if kept.is_file():
            images[image_id] = kept.read_bytes()
        elif "#" not in r["uri"] and time.monotonic() < deadline:
            data = read_uri(r["uri"], timeout=THUMBNAIL_TIMEOUT_S, attempts=1, policy=policy)
            images[image_id] = data if isinstance(data, bytes) else None
    return images
