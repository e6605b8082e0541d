"""Decoding a shard: every image fetched once and decoded once per input size the bundles need,
with each row's read and decode time."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from capfleet.cluster.watchdog import WorkerFailure, deadline
from capfleet.core.artifacts import write_bytes_atomic
from capfleet.core.storage import place
from capfleet.jobs.caption.fetch import (
    MAX_IMAGE_BYTES,
    image_bytes,
    read_parquet_slice,
    read_uri,
    sample_parts,
    stream_tar,
)
from capfleet.jobs.caption.web import DEFAULT_POLICY, UrlPolicy
from capfleet.jobs.gallery import thumbnail_jpeg
from capfleet.model.data import MISSING
from capfleet.model.images import UNREADABLE, ImageError, decode_image

# Reads in flight per worker (threads: reading waits on disks, stores and hosts, not the CPU).
# At 200 ms a request this sustains about 600 images/s, twice a MobileNetV2 int8 actor's
# captioning speed on a VNNI core (64 fell short of it there: bench/README.md, caption_remote).
FETCH_IN_FLIGHT = 128


def fetch_shard(shard: dict, max_bytes: int = MAX_IMAGE_BYTES, policy: UrlPolicy = DEFAULT_POLICY):
    """The shard's images as (bytes or ImageError per row, references per row, read ms per
    row). Rows that came with an error are not fetched."""
    source = str(shard["source"])
    where = json.loads(str(shard["where"]))
    ids, errors = list(shard["image_id"]), list(shard["error"])
    refs = [list(r) for r in shard["references"]]
    n = len(ids)
    data: list = [None] * n
    read_ms = [0.0] * n
    if source == "files":  # many reads in flight: a slow store or host costs latency, not rate
        uris = list(shard["uri"])

        def read(i: int) -> None:
            t0 = time.perf_counter()
            data[i] = read_uri(uris[i], max_bytes, policy=policy)
            read_ms[i] = 1000 * (time.perf_counter() - t0)

        wanted = [i for i in range(n) if not errors[i]]
        if len(wanted) > 1:
            with ThreadPoolExecutor(min(FETCH_IN_FLIGHT, len(wanted))) as pool:
                list(pool.map(read, wanted))
        else:
            for i in wanted:
                read(i)
        return data, refs, read_ms
    t0 = time.perf_counter()
    try:
        if source == "tar":
            index = {k: i for i, k in enumerate(ids)}
            for key, members in stream_tar(where["path"], max_bytes):
                if key in index:
                    i = index[key]
                    data[i], caps = sample_parts(members)
                    refs[i] = refs[i] or caps
        elif source == "parquet":
            columns = [where["column"]] + ([where["captions"]] if where["captions"] else [])
            cols = read_parquet_slice(
                where["path"], where["row_group"], where["offset"], where["length"], columns
            )
            positions = [int(r) for r in shard["rows"]] if "rows" in shard else range(n)
            values, texts = cols[where["column"]], cols.get(where["captions"])
            for i, row in enumerate(positions):
                data[i] = image_bytes(values[row], max_bytes)
                if texts is not None:
                    caps = texts[row] if isinstance(texts[row], list) else [texts[row]]
                    refs[i] = refs[i] or [str(c).strip() for c in caps if c]
        else:
            raise ValueError(f"unknown source {source!r}")
    except Exception as e:  # noqa: BLE001  a shard that cannot be read: every row says why
        failed = ImageError(UNREADABLE, f"{where.get('path', source)}: {type(e).__name__}: {e}")
        data = [d if isinstance(d, bytes | ImageError) else failed for d in data]
    share = 1000 * (time.perf_counter() - t0) / max(n, 1)  # a stream's time, split evenly
    for i in range(n):
        if data[i] is None and not errors[i]:
            data[i] = ImageError(MISSING, "the sample was listed but is not in the shard")
        read_ms[i] = share
    return data, refs, read_ms


@contextlib.contextmanager
def _phase(out: str, shard: dict, name: str, timeout_s: float):
    """With `timeout_s`, a phase of the shard that takes longer ends this worker
    (watchdog.deadline, notes in `out`); an exception becomes the worker's account of it."""
    if not timeout_s:
        yield
        return
    try:
        with deadline(out, int(shard["shard"]), name, timeout_s):
            yield
    except Exception as e:  # a bug, not a bad image: noted, so the rows say what it was
        raise WorkerFailure(f"{name}: {type(e).__name__}: {e}") from e


def fetch_phase(
    shard: dict,
    max_bytes: int = MAX_IMAGE_BYTES,
    policy: UrlPolicy = DEFAULT_POLICY,
    out: str = "",
    timeout_s: float = 0.0,
) -> dict:
    """The shard's item with every row's bytes fetched: adds "data" (bytes or ImageError per
    row) and "read_ms", and the references a tar or Parquet source carries. Bytes only: it
    waits on disks, stores and hosts, not on the CPU."""
    with _phase(out, shard, "fetch", timeout_s):
        data, refs, read_ms = fetch_shard(shard, max_bytes, policy)
    return {**shard, "data": data, "references": refs, "read_ms": read_ms}


def decode_phase(
    fetched: dict,
    sizes: Sequence[int],
    thumbs: dict | None = None,
    out: str = "",
    timeout_s: float = 0.0,
    keep: dict | None = None,
) -> dict:
    """A fetched shard decoded for each input size the bundles need: per size S "image_S":
    (N, S, S, 3) uint8 (zeros in error rows), and per row "error" (the reason, "" when fine),
    "references", "read_ms", "decode_ms". The bytes are taken out of `fetched`, so they are
    let go once decoded. With `thumbs` ({"dir", "ids"}), the images among the gallery's sample
    keep a small JPEG in that folder, so the gallery shows them without fetching them again.
    With `keep` (a dict the caller holds from shard to shard, and uses for nothing else), the
    pixels go into the arrays it keeps, views of which the result holds until the next call:
    a worker decodes shard after shard into the same memory rather than fault in a shard's
    worth of fresh pages (150 MB at 1,024 images of 224 px) for each."""
    with _phase(out, fetched, "decode", timeout_s):
        return _decoded(fetched, sizes, thumbs, {} if keep is None else keep)


def _pixels(keep: dict, size: int, n: int) -> np.ndarray:
    """An (n, size, size, 3) uint8 array: a view of the one `keep` holds for `size`, which is
    replaced by a larger one when a shard needs it."""
    held = keep.get(size)
    if held is None or len(held) < n:
        held = keep[size] = np.empty((n, size, size, 3), np.uint8)
    return held[:n]


def _decoded(fetched: dict, sizes: Sequence[int], thumbs: dict | None, keep: dict) -> dict:
    errors = [str(e) for e in fetched["error"]]
    ids, data = list(fetched["image_id"]), fetched.pop("data")
    n = len(errors)
    images = {s: _pixels(keep, s, n) for s in sizes}
    decode_ms = [0.0] * n
    for i in range(n):
        if not errors[i] and isinstance(data[i], ImageError):
            errors[i] = str(data[i])
        if not errors[i]:
            t0 = time.perf_counter()
            for s in sizes:
                pixels = decode_image(data[i], (s, s))
                if isinstance(pixels, ImageError):
                    errors[i] = str(pixels)
                    break
                images[s][i] = pixels
            decode_ms[i] = 1000 * (time.perf_counter() - t0)
            if thumbs and not errors[i]:
                keep_thumbnail(thumbs, str(ids[i]), data[i])
            data[i] = None  # decoded: its bytes are let go
        if errors[i]:
            for s in sizes:
                images[s][i] = 0
    result = {k: v for k, v in fetched.items() if k not in ("error", "references")}
    result["error"] = errors
    result["references"] = [list(r) for r in fetched["references"]]
    result["read_ms"] = np.array(fetched["read_ms"], np.float64)
    result["decode_ms"] = np.array(decode_ms, np.float64)
    for s, arr in images.items():
        result[f"image_{s}"] = arr
    return result


def load_shard(
    shard: dict,
    sizes: Sequence[int],
    max_bytes: int = MAX_IMAGE_BYTES,
    out: str = "",
    timeout_s: float = 0.0,
    policy: UrlPolicy = DEFAULT_POLICY,
    thumbs: dict | None = None,
) -> dict:
    """Fetch and decode every image of a shard (fetch_phase, then decode_phase): shard is one
    shard's item (listing.Shard.item); with `timeout_s`, each phase that takes longer ends
    this worker (notes in `out`)."""
    fetched = fetch_phase(shard, max_bytes, policy, out, timeout_s)
    return decode_phase(fetched, sizes, thumbs, out, timeout_s)


THUMBS_DIR = "_thumbs"  # OUT/_thumbs/: the gallery sample's thumbnails, kept as the job reads


def thumbnail_path(folder: str | Path, image_id: str) -> Path:
    return place(folder) / f"{hashlib.sha1(image_id.encode()).hexdigest()[:24]}.jpg"


def keep_thumbnail(thumbs: dict, image_id: str, data: bytes) -> None:
    """The image's thumbnail in thumbs["dir"] when it is one of thumbs["ids"]."""
    if image_id not in thumbs["ids"]:
        return
    small = thumbnail_jpeg(data)
    if isinstance(small, bytes):
        write_bytes_atomic(thumbnail_path(thumbs["dir"], image_id), small)
