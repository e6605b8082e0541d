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
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from capfleet.model.data import MISSING
from capfleet.model.images import TOO_LARGE, UNREADABLE, ImageError

MAX_IMAGE_BYTES = 64 * 2**20  # a 100-megapixel JPEG is well under this
HTTP_TIMEOUT_S = 20.0
HTTP_ATTEMPTS = 3  # transient failures (timeouts, 5xx, 429, resets) are retried with backoff
HTTP_BACKOFF_S = 0.5
NOT_A_FILE, TIMEOUT, UNREACHABLE = "not_a_file", "timeout", "unreachable"
USER_AGENT = "capfleet (batch image captioning)"


def read_uri(
    uri: str,
    max_bytes: int = MAX_IMAGE_BYTES,
    timeout: float = HTTP_TIMEOUT_S,
    attempts: int = HTTP_ATTEMPTS,
) -> bytes | ImageError:
    """The bytes behind a local path, an http(s) URL (`timeout` per try, `attempts` tries) or
    a filesystem URI."""
    if uri.startswith(("http://", "https://")):
        return read_http(uri, max_bytes, timeout, attempts)
    if "://" not in uri or uri.startswith("file://"):
        return _read_local(uri[len("file://") :] if uri.startswith("file://") else uri, max_bytes)
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.NotFound:
            return ImageError(MISSING, f"{uri}: no such object")
        if info.size is not None and info.size > max_bytes:
            return _too_large(info.size, max_bytes)
        with filesystem.open_input_stream(path) as f:
            data = f.read(max_bytes + 1)
    except Exception as e:  # noqa: BLE001  any failure to read is one error row
        return ImageError(UNREADABLE, f"{type(e).__name__}: {e}")
    return _too_large(len(data), max_bytes) if len(data) > max_bytes else data


def _read_local(path: str, max_bytes: int) -> bytes | ImageError:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ImageError(MISSING, f"{path}: no such file")
    except OSError as e:
        return ImageError(UNREADABLE, f"{path}: {e.strerror or e}")
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block, /dev/zero would never end
        return ImageError(NOT_A_FILE, f"{path} is not a regular file")
    if st.st_size > max_bytes:
        return _too_large(st.st_size, max_bytes)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        return ImageError(UNREADABLE, f"{path}: {e.strerror or e}")
    return _too_large(len(data), max_bytes) if len(data) > max_bytes else data


def _too_large(size: int, max_bytes: int) -> ImageError:
    return ImageError(TOO_LARGE, f"{size} bytes exceeds the {max_bytes}-byte cap per image")


def read_http(
    url: str,
    max_bytes: int = MAX_IMAGE_BYTES,
    timeout: float = HTTP_TIMEOUT_S,
    attempts: int = HTTP_ATTEMPTS,
):
    """GET with a timeout, bounded retries with backoff for transient failures, a size cap;
    an HTTP error status is `http_<code>`."""
    error = ImageError(UNREACHABLE, url)
    for attempt in range(attempts):
        if attempt:
            time.sleep(HTTP_BACKOFF_S * 2 ** (attempt - 1))
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > max_bytes:
                    return _too_large(int(length), max_bytes)
                data = response.read(max_bytes + 1)
                return _too_large(len(data), max_bytes) if len(data) > max_bytes else data
        except urllib.error.HTTPError as e:
            error = ImageError(f"http_{e.code}", f"{url}: {e.reason}")
            if e.code != 429 and e.code < 500:
                return error  # the server's answer will not change
        except (TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            timed_out = isinstance(e, TimeoutError) or isinstance(reason, TimeoutError)
            error = ImageError(TIMEOUT if timed_out else UNREACHABLE, f"{url}: {reason}")
        except ValueError as e:  # a malformed URL
            return ImageError(UNREACHABLE, f"{url}: {e}")
    return error


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

    if "://" in uri and not uri.startswith("file://"):
        filesystem, path = fs.FileSystem.from_uri(uri)
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
            if m.size > max_bytes:
                members[ext] = _too_large(m.size, max_bytes)
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


def image_bytes(value) -> bytes | ImageError:
    """A cell of an image column: raw bytes, or the Hugging Face {bytes, path} struct."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) if len(value) else ImageError("empty", "the cell holds no bytes")
    return ImageError(MISSING, "the image cell is null")


def read_parquet_slice(uri: str, row_group: int, offset: int, length: int, columns: list[str]):
    """`length` rows from `offset` of one row group of a Parquet file: {column: values}."""
    import pyarrow.parquet as pq

    with open_binary(uri, seekable=True) as f:
        table = pq.ParquetFile(f).read_row_group(row_group, columns=columns)
    part = table.slice(offset, length)
    return {c: part.column(c).to_pylist() for c in columns}
