"""Reading a caption job's inputs: records cut into fixed shards, and each image's bytes.

Work is cut into shards of consecutive input images. A shard's output for one model is one
Parquet part, so a rerun into the same output directory knows what is done by the files alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from capfleet.model.data import ImageRecord
from capfleet.model.images import UNREADABLE, ImageError


def shard_records(records: Sequence[ImageRecord], shard_size: int) -> list[list[ImageRecord]]:
    """Consecutive, fixed shards: the same input always cuts the same way, so a rerun knows
    which shards are done by the files alone."""
    return [list(records[i : i + shard_size]) for i in range(0, len(records), shard_size)]


def read_uri(uri: str) -> bytes | ImageError:
    """The bytes behind a local path, file:// or object-store URI (pyarrow filesystems)."""
    from pyarrow import fs

    try:
        if "://" in uri:
            filesystem, path = fs.FileSystem.from_uri(uri)
        else:
            filesystem, path = fs.LocalFileSystem(), os.path.abspath(uri)
        with filesystem.open_input_stream(path) as f:
            return f.read()
    except Exception as e:  # noqa: BLE001  any failure to read is one error row
        return ImageError(UNREADABLE, f"{type(e).__name__}: {e}")
