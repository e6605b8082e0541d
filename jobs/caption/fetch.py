"""Fetching each image's bytes: local files, pyarrow filesystems (s3://, gs://, file://...),
HTTP(S), a WebDataset tar shard's members, and a Parquet column of image bytes.

Nothing here raises for one bad image: a failure is an ImageError whose reason lands in that
row's `error` column. Every read is capped at `max_bytes`, so a multi-GB file, /dev/zero or a
FIFO is an error row, never an out-of-memory or a hang.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator

from capfleet.core.storage import is_uri, place
from capfleet.jobs.caption.web import (
    DEFAULT_POLICY,
    HTTP_ATTEMPTS,
    MAX_IMAGE_BYTES,
    UrlPolicy,
    read_http,
    too_large,
)
from capfleet.model.data import MISSING
from capfleet.model.images import UNREADABLE, ImageError

MAX_CAPTION_BYTES = 64 * 2**10  # a tar sample's txt/json references: text, not an image
NOT_A_FILE = "not_a_file"
PARQUET_BATCH = 256  # rows decoded at a time when a shard reads its slice of a row group


def read_uri(
    uri: str,
    max_bytes: int = MAX_IMAGE_BYTES,
    timeout: float | None = None,
    attempts: int = HTTP_ATTEMPTS,
    policy: UrlPolicy = DEFAULT_POLICY,
) -> bytes | ImageError:
    """The bytes behind a local path, an http(s) URL (jobs/caption/web.py: one deadline of
    `timeout` per try, `attempts` tries, the URL policy) or a filesystem URI."""
    if "://" in uri and uri.split("://", 1)[0].lower() in ("http", "https"):
        return read_http(uri, max_bytes, timeout, attempts, policy)
    if "://" not in uri or uri.startswith("file://"):
        return _read_local(uri[len("file://") :] if uri.startswith("file://") else uri, max_bytes)
    from pyarrow import fs

    try:
        where = place(uri)  # options written in the URI (endpoint_override...) kept
        filesystem, path = where.fs, where.path
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.NotFound:
            return ImageError(MISSING, f"{uri}: no such object")
        if info.size is not None and info.size > max_bytes:
            return too_large(info.size, max_bytes)
        with filesystem.open_input_stream(path) as f:
            data = f.read(max_bytes + 1)
    except Exception as e:  # noqa: BLE001  any failure to read is one error row
        return ImageError(UNREADABLE, f"{type(e).__name__}: {e}")
    return too_large(len(data), max_bytes) if len(data) > max_bytes else data


def _read_local(path: str, max_bytes: int) -> bytes | ImageError:
    """A regular file's bytes, capped. Opened without blocking and checked on the opened
    descriptor (fstat), so a FIFO swapped in after a listing cannot hold the read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return ImageError(MISSING, f"{path}: no such file")
    except OSError as e:
        return ImageError(UNREADABLE, f"{path}: {e.strerror or e}")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block, /dev/zero never end; a folder
        os.close(fd)
        return ImageError(NOT_A_FILE, f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > max_bytes:
            return too_large(st.st_size, max_bytes)
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            return ImageError(UNREADABLE, f"{path}: {e.strerror or e}")
    return too_large(len(data), max_bytes) if len(data) > max_bytes else data


# -- WebDataset tar shards ------------------------------------------------------------------

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the sample's image, first found wins
CAPTION_EXTENSIONS = ("txt", "json")


def sample_key(member: str) -> tuple[str, str]:
    """WebDataset's convention: "dir/key.ext.more" -> ("dir/key", "ext.more")."""
    folder, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def open_binary(uri: str, seekable: bool = False):
    """A file object for a local path or filesystem URI (seekable for listing a tar)."""
    from pyarrow import fs

    if is_uri(uri):
        where = place(uri)
        filesystem, path = where.fs, where.path
    else:
        filesystem, path = fs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    return filesystem.open_input_file(path) if seekable else filesystem.open_input_stream(path)


def list_tar(uri: str) -> list[str]:
    """The sample keys of a tar shard, in order, from its headers alone (no member is read)."""
    with open_binary(uri, seekable=True) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        keys = dict.fromkeys(sample_key(m.name)[0] for m in tar if m.isfile())
    return list(keys)


def stream_tar(uri: str, max_bytes: int) -> Iterator[tuple[str, dict[str, bytes | ImageError]]]:
    """(key, {ext: bytes}) per sample, reading the tar once as a stream (never unpacked to
    disk); a member over `max_bytes` is an ImageError in place of its bytes."""
    key, members = None, {}
    with open_binary(uri) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, ext = sample_key(m.name)
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            if ext not in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS:
                continue
            cap = max_bytes if ext in IMAGE_EXTENSIONS else MAX_CAPTION_BYTES
            if m.size > cap:
                members[ext] = too_large(m.size, cap)
            else:
                members[ext] = tar.extractfile(m).read()
    if key is not None:
        yield key, members


def sample_parts(members: dict) -> tuple[bytes | ImageError, list[str]]:
    """A WebDataset sample's image bytes (or why there are none) and reference captions: a
    `txt` member (one caption per line), or `json` with `caption` or `captions`."""
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    if image is None:
        image = ImageError(MISSING, f"no {'/'.join(IMAGE_EXTENSIONS)} member in the sample")
    captions: list[str] = []
    if isinstance(members.get("txt"), bytes):
        text = members["txt"].decode("utf-8", errors="replace")
        captions = [line.strip() for line in text.splitlines() if line.strip()]
    elif isinstance(members.get("json"), bytes):
        captions = _json_captions(members["json"])
    return image, captions


def _json_captions(data: bytes) -> list[str]:
    import json

    try:
        doc = json.loads(data)
    except ValueError:
        return []
    if not isinstance(doc, dict):
        return []
    value = doc.get("captions", doc.get("caption"))
    values = value if isinstance(value, list) else [value]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


# -- Parquet columns of image bytes ---------------------------------------------------------


def image_bytes(value, max_bytes: int = MAX_IMAGE_BYTES) -> bytes | ImageError:
    """A cell of an image column: raw bytes, or the Hugging Face {bytes, path} struct; capped
    at `max_bytes` like every other read."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) > max_bytes:
            return too_large(len(value), max_bytes)
        return bytes(value) if len(value) else ImageError("empty", "the cell holds no bytes")
    return ImageError(MISSING, "the image cell is null")


def read_parquet_slice(uri: str, row_group: int, offset: int, length: int, columns: list[str]):
    """`length` rows from `offset` of one row group of a Parquet file: {column: values}. Read
    in record batches of PARQUET_BATCH rows, keeping only the slice's: a shard never holds a
    whole row group's images (a file written with pyarrow's defaults may be one row group of
    a million rows)."""
    import pyarrow.parquet as pq

    out: dict[str, list] = {c: [] for c in columns}
    seen = 0
    with open_binary(uri, seekable=True) as f:
        batches = pq.ParquetFile(f).iter_batches(
            batch_size=PARQUET_BATCH, row_groups=[row_group], columns=columns
        )
        for batch in batches:
            start, end = max(offset - seen, 0), min(offset + length - seen, batch.num_rows)
            if start < end:
                part = batch.slice(start, end - start)
                for c in columns:
                    out[c] += part.column(c).to_pylist()
            seen += batch.num_rows
            if seen >= offset + length:
                break
    return out
