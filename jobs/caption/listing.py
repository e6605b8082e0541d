"""Reading a caption job's inputs: what is listed, cut into shards (the unit of work and of
resume). The driver lists ids and where each image is; the bytes are fetched by the decode
stage (fetch.py), on the workers.

Sources:
  files    any reader of capfleet.model.data (a folder, a Flickr8k split, a COCO JSON, a CSV or
           Parquet manifest of paths, local or object-store or http(s) URIs): consecutive
           records cut into fixed shards of `shard_size`
  tar      WebDataset shards (a .tar, a folder of them, a glob or {000..009} pattern): one
           shard per tar file, one row per sample key, read as a stream
  parquet  Parquet files with the images' bytes in a column (Hugging Face's {bytes, path}
           struct, or plain binary): shards of at most `shard_size` rows of one row group
The same input always cuts the same way, so a rerun knows what is done by the files alone.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from capfleet.core.errors import DataError
from capfleet.core.storage import is_uri, place
from capfleet.jobs.caption.fetch import list_tar, open_binary
from capfleet.model.data import ImageRecord, open_reader

ID_COLUMNS = ("image_id", "id", "key", "__key__")
CAPTION_COLUMNS = ("captions", "caption", "text")


@dataclass
class Shard:
    """One unit of work: inputs read together, whose output for one model is one part file."""

    shard: int
    image_id: list[str]
    uri: list[str]  # where each image is, as the output shows it
    error: list[str]  # a reason known before reading ("missing: ..."), else ""
    references: list[list[str]]  # reference captions per image ([] when none)
    source: str = "files"  # files | tar | parquet
    where: dict = field(default_factory=dict)  # tar: path; parquet: path, row group, slice
    rows: list[int] | None = None  # positions in the shard, when only some rows are redone

    def __len__(self) -> int:
        return len(self.image_id)

    def item(self) -> dict:
        """What travels to a worker: plain columns (the location as JSON)."""
        return {
            "shard": self.shard,
            "source": self.source,
            "where": json.dumps(self.where),
            "image_id": self.image_id,
            "uri": self.uri,
            "error": self.error,
            "references": self.references,
            "rows": self.rows if self.rows is not None else list(range(len(self))),
        }

    def subset(self, rows: list[int]) -> Shard:
        """The same shard with only these rows (positions), to redo failed rows alone."""
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return replace(
            self,
            image_id=pick(self.image_id),
            uri=pick(self.uri),
            error=pick(self.error),
            references=pick(self.references),
            rows=list(rows),
        )


@dataclass
class Listing:
    shards: list[Shard]
    kind: str  # what was read, for the log

    @property
    def images(self) -> int:
        return sum(len(s) for s in self.shards)

    def identity(self) -> str:
        """sha256 of every listed (id, uri, references), in order: what resume must match (the
        rows hold the references they were scored against)."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.source}\t{json.dumps(s.where, sort_keys=True)}\n".encode())
            for i, u, refs in zip(s.image_id, s.uri, s.references, strict=True):
                line = "\t".join([i, u, *refs]) + "\n"
                h.update(line.encode("utf-8", errors="backslashreplace"))
        return h.hexdigest()


def list_inputs(
    input: str,
    split: str = "",
    shard_size: int = 1024,
    image_column: str = "",
    exclude: str = "",
    caption_column: str = "",
) -> Listing:
    """Every input image of a caption job, in shards; files under `exclude` (the job's own
    output folder, when it lies inside a folder input) are left out. `image_column`: Parquet's
    column of image bytes, or a manifest's column of paths or URLs; `caption_column`: a
    manifest's column of references."""
    tars = tar_paths(input)
    if tars:
        return _list_tars(tars)
    parquets = parquet_paths(input)
    if parquets:
        blobs = _image_columns(parquets[0])
        if (image_column and image_column in blobs) or (not image_column and blobs):
            return _list_parquet(parquets, shard_size, image_column)
    reader = open_reader(input, split or None, image_column, caption_column)
    records = [_absolute(r) for r in reader.records(include_missing=True)]
    if exclude and is_uri(exclude):  # OUT in the store, inside the input's prefix
        out = place(exclude)
        head = f"{out.scheme}://{out.authority}/{out.key}/"
        records = [r for r in records if not r.uri.split("?", 1)[0].startswith(head)]
    elif exclude and "://" not in exclude:
        inside = os.path.abspath(exclude) + os.sep
        records = [r for r in records if not r.uri.startswith(inside)]
    return Listing(shard_records(records, shard_size), type(reader).__name__)


def recut(listing: Listing, shard_size: int) -> Listing:
    """The listing cut as list_inputs would cut it at `shard_size`, without listing again (an
    object store's listing, a Parquet file's ids read twice): files re-chunked in order, each
    Parquet row group's rows cut again from its start, one tar still one shard."""
    shards: list[Shard] = []

    def add(s: Shard, start: int, stop: int, where: dict) -> None:
        take = lambda xs: xs[start:stop]  # noqa: E731
        shards.append(
            replace(
                s,
                shard=len(shards),
                image_id=take(s.image_id),
                uri=take(s.uri),
                error=take(s.error),
                references=take(s.references),
                where=where,
                rows=None,
            )
        )

    runs: list[Shard] = []  # consecutive shards that a fresh listing would cut as one run

    def flush() -> None:
        if not runs:
            return
        first = runs[0]
        whole = replace(
            first,
            image_id=[i for s in runs for i in s.image_id],
            uri=[u for s in runs for u in s.uri],
            error=[e for s in runs for e in s.error],
            references=[r for s in runs for r in s.references],
        )
        for start in range(0, len(whole), shard_size):
            where = dict(first.where)
            if first.source == "parquet":
                stop = min(start + shard_size, len(whole))
                where.update(offset=first.where["offset"] + start, length=stop - start)
            add(whole, start, start + shard_size, where)
        runs.clear()

    def same(a, b) -> bool:  # shards of one run: one source, one Parquet row group
        return a.source == b.source and (
            a.source != "parquet"
            or (a.where["path"], a.where["row_group"]) == (b.where["path"], b.where["row_group"])
        )

    for s in listing.shards:
        if s.source == "tar":
            flush()
            add(s, 0, len(s), s.where)
            continue
        if runs and not same(runs[0], s):
            flush()
        runs.append(s)
    flush()
    return Listing(shards, listing.kind)


def first_images(listing: Listing, limit: int) -> Listing:
    """The listing cut to its first `limit` images (whole shards, then part of the last one):
    a trial run on a sample of a large input, cut the same way every time."""
    shards, left = [], limit
    for s in listing.shards:
        if left <= 0:
            break
        if len(s) > left:
            keep = lambda xs, n=left: xs[:n]  # noqa: E731
            where = dict(s.where)
            if "length" in where:  # a Parquet row group's slice
                where["length"] = left
            s = replace(
                s,
                image_id=keep(s.image_id),
                uri=keep(s.uri),
                error=keep(s.error),
                references=keep(s.references),
                where=where,
            )
        shards.append(s)
        left -= len(s)
    return Listing(shards, f"the first {sum(map(len, shards))} of {listing.kind}")


def shard_records(records: list[ImageRecord], shard_size: int) -> list[Shard]:
    """Consecutive, fixed shards of records."""
    return [
        Shard(
            n,
            [r.image_id for r in chunk],
            [r.uri for r in chunk],
            [r.error for r in chunk],
            [list(r.captions) for r in chunk],
        )
        for n, chunk in enumerate(
            records[i : i + shard_size] for i in range(0, len(records), shard_size)
        )
    ]


def with_references(listing: Listing, refs: dict[str, tuple[str, ...]]) -> Listing:
    """The listing with each image's references taken from `refs` (by id) where it has some."""
    shards = []
    for s in listing.shards:
        pairs = zip(s.image_id, s.references, strict=True)
        shards.append(replace(s, references=[list(refs.get(i, r)) for i, r in pairs]))
    return replace(listing, shards=shards)


def _absolute(r: ImageRecord) -> ImageRecord:
    """Local paths made absolute here, in the driver: workers may run elsewhere."""
    return r if "://" in r.uri or r.error else replace(r, uri=os.path.abspath(r.uri))


# -- WebDataset --------------------------------------------------------------------------------

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard notation: "shards-{000..002}.tar" -> three names (zero-padded)."""
    m = _BRACES.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    names = [
        f"{pattern[: m.start()]}{n:0{width}d}{pattern[m.end() :]}"
        for n in range(int(lo), int(hi) + 1)
    ]
    return [x for name in names for x in expand_braces(name)]


def _is_tar(name: str) -> bool:
    return _file_name(name).lower().endswith((".tar", ".tar.gz", ".tgz"))


def _file_name(name: str) -> str:
    """A path's file name, or a URI's, without its options (?endpoint_override=...)."""
    return place(name).name if is_uri(name) else Path(name).name


def _matching(pattern: str, keep) -> list[str]:
    """Files matching a glob (local or a filesystem URI), sorted; or the path itself."""
    if not is_uri(pattern):
        if not any(c in pattern for c in "*?["):
            return [pattern]
        return sorted(glob.glob(pattern.removeprefix("file://")))
    # in a URI, `?` starts the options (kept on every name listed), so only * and [ glob
    where = place(pattern)
    if not any(c in where.key for c in "*["):
        return [pattern]
    head = where.key.split("*", 1)[0].split("[", 1)[0]
    prefix = head.rsplit("/", 1)[0] if "/" in head else ""
    base = where.with_key(prefix)
    return sorted(
        str(base / rel)
        for rel in base.files()
        if fnmatch.fnmatch(f"{prefix}/{rel}" if prefix else rel, where.key) and keep(rel)
    )


def tar_paths(input: str) -> list[str]:
    """The tar shards `input` names: a tar file, a folder holding tars, a glob, {a..b}."""
    if os.path.isdir(input):
        return sorted(str(p) for p in Path(input).iterdir() if p.is_file() and _is_tar(p.name))
    names = [n for pattern in expand_braces(input) for n in _matching(pattern, _is_tar)]
    return [n for n in names if _is_tar(n)]


def _list_tars(paths: list[str]) -> Listing:
    shards = []
    for n, path in enumerate(paths):
        try:
            keys = list_tar(path)
        except Exception as e:  # noqa: BLE001  a tar that cannot be listed is refused by name
            raise DataError(f"{path}: cannot read the tar shard ({e})") from e
        uri = path if "://" in path else os.path.abspath(path)
        shards.append(
            Shard(
                n,
                keys,
                [f"{uri}#{k}" for k in keys],
                [""] * len(keys),
                [[] for _ in keys],
                "tar",
                {"path": uri, "stamp": file_stamp(uri)},
            )
        )
    return Listing(shards, f"{len(paths)} WebDataset tar shard(s)")


# -- Parquet with image bytes ------------------------------------------------------------------


def parquet_paths(input: str) -> list[str]:
    """The Parquet files `input` names: a file, a folder holding them, or a glob."""
    if os.path.isdir(input):
        return sorted(str(p) for p in Path(input).iterdir() if p.suffix.lower() == ".parquet")
    names = [n for pattern in expand_braces(input) for n in _matching(pattern, lambda p: True)]
    return [n for n in names if _file_name(n).lower().endswith(".parquet")]


def _image_columns(path: str) -> list[str]:
    """Columns that can hold image bytes: binary, or a struct with a binary `bytes` field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_binary(path, seekable=True) as f:
        schema = pq.ParquetFile(f).schema_arrow
    out = []
    for fld in schema:
        t = fld.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            out.append(fld.name)
        elif pa.types.is_struct(t):
            inner = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
            if "bytes" in inner and (
                pa.types.is_binary(inner["bytes"]) or pa.types.is_large_binary(inner["bytes"])
            ):
                out.append(fld.name)
    return out


def _list_parquet(paths: list[str], shard_size: int, image_column: str) -> Listing:
    import pyarrow.parquet as pq

    shards: list[Shard] = []
    for path in paths:
        candidates = _image_columns(path)
        column = image_column or (candidates[0] if len(candidates) == 1 else "")
        if image_column and image_column not in candidates:
            raise DataError(
                f"{path}: {image_column!r} is not a column of image bytes; "
                f"found {', '.join(candidates) or 'none'}"
            )
        if not column:
            raise DataError(
                f"{path}: several columns hold bytes ({', '.join(candidates)}); "
                "choose one with --image-column"
            )
        uri = path if "://" in path else os.path.abspath(path)
        stamp = file_stamp(uri)
        with open_binary(path, seekable=True) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            id_col = next((c for c in ID_COLUMNS if c in names), None)
            cap_col = next((c for c in CAPTION_COLUMNS if c in names), None)
            struct_path = _has_path_field(pf.schema_arrow, column)
            first = 0
            for g in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(g).num_rows
                if id_col:
                    ids = [
                        str(v) for v in pf.read_row_group(g, columns=[id_col])[id_col].to_pylist()
                    ]
                elif struct_path:
                    part = pf.read_row_group(g, columns=[f"{column}.path"]).column(0)
                    got = [v and v.get("path") for v in part.to_pylist()]
                    ids = [
                        str(v) if v else f"{_file_name(uri)}:{first + i}" for i, v in enumerate(got)
                    ]
                else:
                    ids = [f"{_file_name(uri)}:{first + i}" for i in range(rows)]
                for offset in range(0, rows, shard_size):
                    chunk = ids[offset : offset + shard_size]
                    where = {
                        "path": uri,
                        "stamp": stamp,
                        "row_group": g,
                        "offset": offset,
                        "length": len(chunk),
                        "column": column,
                        "captions": cap_col or "",
                    }
                    shards.append(
                        Shard(
                            len(shards),
                            chunk,
                            [f"{uri}#{first + offset + i}" for i in range(len(chunk))],
                            [""] * len(chunk),
                            [[] for _ in chunk],
                            "parquet",
                            where,
                        )
                    )
                first += rows
    return Listing(shards, f"{len(paths)} Parquet file(s) of image bytes ({column})")


def file_stamp(uri: str) -> str:
    """A file's size and modification time: a tar or Parquet file rewritten in place has
    another identity (its contents are read by the workers, not listed)."""
    import pyarrow.fs as pafs

    if is_uri(uri):
        where = place(uri)
        filesystem, path = where.fs, where.path
    else:
        filesystem, path = pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    info = filesystem.get_file_info(path)
    mtime = info.mtime_ns if info.mtime_ns is not None else ""
    return f"{info.size}:{mtime}"


def _has_path_field(schema, column: str) -> bool:
    import pyarrow as pa

    t = schema.field(column).type
    return pa.types.is_struct(t) and any(t.field(i).name == "path" for i in range(t.num_fields))
