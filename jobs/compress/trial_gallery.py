"""A compress run's gallery: at the end of the run OUT/gallery.html shows a sample of the test
images with every trial's caption side by side, read from the scored captions each trial kept
(compression/records.py); jobs/gallery.py renders it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from capfleet.compression.records import TRIAL_CAPTIONS_SCHEMA
from capfleet.core.storage import place, read_parquet
from capfleet.jobs.gallery import GALLERY_FILE, check_gallery_size, sample_ids, write_gallery


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
        elif place(path).is_file():
            kept[name] = read_parquet(path).cast(TRIAL_CAPTIONS_SCHEMA).to_pylist()
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
    return write_gallery(place(out) / GALLERY_FILE, [items[i] for i in ids], list(kept), title)
