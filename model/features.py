"""Loading images for training and caching frozen-encoder features on disk (npy)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from capfleet.model.artifacts import write_bytes_atomic, write_json_atomic
from capfleet.model.data import ImageRecord, read_split
from capfleet.model.errors import CapfleetError
from capfleet.model.images import ImageError, decode_image, preprocess


def load_images(
    records: Sequence[ImageRecord], size: int, log: Callable[[str], None] = print
) -> tuple[np.ndarray, list[ImageRecord]]:
    """Decode every record's image to (N, size, size, 3) uint8, skipping (and reporting) bad
    ones. Returns the images and the records that decoded, in order."""
    images, kept, bad = [], [], []
    for rec in records:
        try:
            data = Path(rec.uri).read_bytes()
        except OSError as e:
            bad.append(f"{rec.uri}: {e.strerror or e}")
            continue
        out = decode_image(data, (size, size))
        if isinstance(out, ImageError):
            bad.append(f"{rec.uri}: {out}")
            continue
        images.append(out)
        kept.append(rec)
    if bad:
        log(f"skipped {len(bad)} unreadable images, e.g. {bad[0]}")
    if not images:
        raise CapfleetError(f"none of {len(records)} images could be read, e.g. {bad[0]}")
    return np.stack(images), kept


def load_split(
    data: str, split: str, size: int, limit: int = 0, log: Callable[[str], None] = print
) -> tuple[np.ndarray, list[ImageRecord]]:
    """A training data set's split (its first `limit` images; 0 = all), decoded by `load_images`
    to (N, size, size, 3) uint8, with the records that decoded."""
    records = read_split(data, split)
    return load_images(records[:limit] if limit else records, size, log)


def cache_key(encoder: str, weights: str, records: Sequence[ImageRecord]) -> str:
    """Features depend on the encoder, its weights (a weights file by its size and mtime too)
    and the exact images (by path, size and mtime)."""
    h = hashlib.sha256(f"{encoder}\n{weights}\n".encode())
    if os.path.isfile(weights):
        st = os.stat(weights)
        h.update(f"{st.st_size}\t{st.st_mtime_ns}\n".encode())
    for r in records:
        st = os.stat(r.uri)
        h.update(f"{r.image_id}\t{r.uri}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cached_features(
    backbone,
    encoder: str,
    weights_id: str,
    style: str,
    images: np.ndarray,
    records: Sequence[ImageRecord],
    cache_dir: str | Path,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
) -> np.ndarray:
    """(N, F) float32 features of a frozen backbone, computed once per (encoder, weights, images)
    and kept as npy in `cache_dir` (written atomically, so a crash leaves no half file)."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = cache_key(encoder, weights_id, records)
    path = cache / f"{encoder}-{key}.npy"
    if path.is_file():
        log(f"features: cached {path.name}")
        return np.load(path)
    log(f"features: computing {encoder} for {len(images)} images")
    feats = [
        backbone.predict_on_batch(preprocess(images[i : i + batch_size], style))
        for i in range(0, len(images), batch_size)
    ]
    out = np.concatenate(feats).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, out)
    write_bytes_atomic(path, buf.getvalue())
    ids = {"encoder": encoder, "weights": weights_id, "image_ids": [r.image_id for r in records]}
    write_json_atomic(cache / f"{encoder}-{key}.json", ids)
    return out
