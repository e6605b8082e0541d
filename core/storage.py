"""Where a job reads and writes: a local path, or a filesystem URI (s3://, gs://, abfs://,
hdfs://...) through pyarrow's filesystems.

`place(loc)` gives a `pathlib.Path` for a local path (or file://) and a `StorePath` for a URI.
A StorePath answers the few pathlib calls the jobs use (`/`, name, parent, exists, is_file,
read_bytes, write_bytes, glob, unlink, open), so a job's code reads the same for both.

- Options written in the URI (`?endpoint_override=...&region=...`) are kept verbatim in every
  path joined from it, so the driver and every worker reach the same store.
- Credentials and endpoints come the way the cloud SDKs take them: AWS_ENDPOINT_URL,
  AWS_PROFILE, AWS_ACCESS_KEY_ID..., GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY.
- An object is published whole: `write_bytes` is one upload, visible only once complete (an
  object store has no rename, and needs none). A local file is written under a temporary name
  and renamed (core.artifacts.write_bytes_atomic).

Why pyarrow's filesystems rather than fsspec: pyarrow is already every worker's Parquet
reader, its S3, GCS and Azure clients are native (no event loop in each actor), and it reads
the standard SDK settings; `pyarrow.fs.FileSystem.from_uri` names the schemes it serves.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import re
from pathlib import Path

from capfleet.core.errors import CapfleetError

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(loc) -> bool:
    """A filesystem URI other than file:// (which is a local path)."""
    if isinstance(loc, StorePath):
        return True
    s = str(loc)
    return bool(URI.match(s)) and not s.startswith("file://")


def place(loc: str | Path | StorePath) -> Path | StorePath:
    """The path object for a location a user gave: Path for local files, StorePath for URIs."""
    if isinstance(loc, (StorePath, Path)):
        return loc
    s = str(loc)
    if s.startswith("file://"):
        return Path(s.removeprefix("file://"))
    return StorePath(s) if URI.match(s) else Path(s)


def local(loc) -> Path | StorePath:
    """`place`, with a local path made absolute (what a worker on another process needs)."""
    p = place(loc)
    return p if isinstance(p, StorePath) else Path(p).resolve()


@functools.lru_cache(maxsize=64)
def _filesystem(root: str):
    """One filesystem object per store root and options (creating an S3 client costs)."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(root)
    except (ValueError, OSError) as e:
        raise CapfleetError(f"{root}: not a filesystem pyarrow can open ({e})") from None


class StoreError(CapfleetError, OSError):
    """An object store refused or failed a request (permissions, a missing bucket, a network
    error): a clear one-line error for the CLI, still an OSError for callers that retry."""


def _failed(what: str, where, e: OSError) -> OSError:
    """FileNotFoundError stays as it is (callers test for absence); anything else names the
    store's path and the operation."""
    if isinstance(e, FileNotFoundError):
        return e
    return StoreError(f"{where}: cannot {what} ({e})")


class StorePath:
    """A file or folder in an object store or other pyarrow filesystem, named by its URI."""

    def __init__(self, uri: str):
        head, _, self.query = uri.partition("?")
        self.scheme, _, rest = head.partition("://")
        rest = rest.rstrip("/")
        self.authority, _, self.key = rest.partition("/")  # bucket (or container@account), key
        if not self.authority:
            raise CapfleetError(f"{uri}: no bucket or host in this URI")

    # naming -------------------------------------------------------------------------------
    def with_key(self, key: str) -> StorePath:
        """The same store and options, another key (a key may hold '?': not parsed again)."""
        other = object.__new__(StorePath)
        other.scheme, other.authority, other.query = self.scheme, self.authority, self.query
        other.key = key.strip("/")
        return other

    def __truediv__(self, name) -> StorePath:
        name = str(name).strip("/")
        return self.with_key(f"{self.key}/{name}" if self.key else name)

    def __str__(self) -> str:
        q = f"?{self.query}" if self.query else ""
        tail = f"/{self.key}" if self.key else ""
        return f"{self.scheme}://{self.authority}{tail}{q}"

    def __repr__(self) -> str:
        return f"StorePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, StorePath) and str(self) == str(other)

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def parent(self) -> StorePath:
        return self.with_key(self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    def with_name(self, name: str) -> StorePath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> StorePath:
        return self.with_name(self.stem + suffix)

    def resolve(self) -> StorePath:
        return self

    # the filesystem ------------------------------------------------------------------------
    @property
    def fs(self):
        q = f"?{self.query}" if self.query else ""
        return _filesystem(f"{self.scheme}://{self.authority}{q}")[0]

    @property
    def path(self) -> str:
        """The path inside the filesystem (bucket/key)."""
        q = f"?{self.query}" if self.query else ""
        root = _filesystem(f"{self.scheme}://{self.authority}{q}")[1].rstrip("/")
        return f"{root}/{self.key}" if self.key else root

    def _info(self):
        try:
            return self.fs.get_file_info(self.path)
        except OSError as e:
            raise _failed("look up", self, e) from None

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def mtime(self) -> float | None:
        info = self._info()
        return info.mtime.timestamp() if info.mtime is not None else None

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.readall()
        except OSError as e:
            raise _failed("read", self, e) from None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One upload: the object appears whole when it completes, never in part."""
        try:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        except OSError as e:
            raise _failed("write", self, e) from None

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def open(self, mode: str = "rb"):
        """A random-access file (Parquet footers, ranges)."""
        if mode != "rb":
            raise ValueError("StorePath.open reads only; write with write_bytes")
        try:
            return self.fs.open_input_file(self.path)
        except OSError as e:
            raise _failed("open", self, e) from None

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store has no folders, its keys make them."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError as e:
            raise _failed("delete", self, e) from None

    def files(self, recursive: bool = True):
        """The paths of the files under this folder, relative to it."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(sel)
        except OSError as e:
            raise _failed("list", self, e) from None
        base = self.path.rstrip("/") + "/"
        for info in infos:
            if info.type == pafs.FileType.File and info.path.startswith(base):
                yield info.path[len(base) :]

    def listing(self) -> dict[str, tuple[int, int]]:
        """{path relative to this folder: (size, mtime in ns)} of every file under it."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        base = self.path.rstrip("/") + "/"
        try:
            infos = self.fs.get_file_info(sel)
        except OSError as e:
            raise _failed("list", self, e) from None
        return {
            i.path[len(base) :]: (i.size, i.mtime_ns)
            for i in infos
            if i.type == pafs.FileType.File and i.path.startswith(base)
        }

    def glob(self, pattern: str):
        """Files under this folder whose path relative to it matches (fnmatch; `*` stays
        within one folder level, as pathlib's does)."""
        depth = pattern.count("/")
        for rel in sorted(self.files(recursive=depth > 0 or "**" in pattern)):
            if "**" in pattern or rel.count("/") == depth:
                if _match(rel, pattern):
                    yield self / rel

    def rglob(self, pattern: str):
        for rel in sorted(self.files(recursive=True)):
            if fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], pattern):
                yield self / rel

    def iterdir(self):
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(sel)
        except OSError as e:
            raise _failed("list", self, e) from None
        for info in infos:
            yield self / info.path.rstrip("/").rsplit("/", 1)[-1]


def _match(rel: str, pattern: str) -> bool:
    if "**" in pattern:
        return fnmatch.fnmatchcase(rel, pattern.replace("**/", "*"))
    return all(
        fnmatch.fnmatchcase(a, b) for a, b in zip(rel.split("/"), pattern.split("/"), strict=True)
    )


def open_parquet(path: Path | StorePath):
    """A pyarrow.parquet.ParquetFile of a local file or an object."""
    import pyarrow.parquet as pq

    p = place(path)
    return pq.ParquetFile(p.open() if isinstance(p, StorePath) else str(p))


def read_parquet(path: Path | StorePath, columns=None):
    import pyarrow.parquet as pq

    p = place(path)
    if isinstance(p, StorePath):
        return pq.read_table(p.path, filesystem=p.fs, columns=columns)
    return pq.read_table(p, columns=columns)


def parquet_metadata(path: Path | StorePath):
    import pyarrow.parquet as pq

    p = place(path)
    if isinstance(p, StorePath):
        with p.open() as f:
            return pq.read_metadata(f)
    return pq.read_metadata(p)


@contextlib.contextmanager
def node_lock(path: Path):
    """An exclusive lock among this node's processes (flock on `path`): the actors or tasks of
    one node that want the same cache entry fetch it once, the others wait and reuse it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


MIRROR_DIR = "capfleet-mirror"  # under the node's temporary folder: store folders copied here


def mirror(loc: str | Path | StorePath) -> Path:
    """A local copy of `loc`: `loc` itself when local; for a store folder (a model directory,
    a data set) or file (a flatbuffer) a copy on this node, made once per content (named by
    the listing's names, sizes and times) and published whole by a rename, so that the tasks
    on a node share one copy. Each copied file keeps the store's modification time, so a copy
    stats as its object lists (the feature cache keys a store's images and a node's copy of
    them alike)."""
    import hashlib
    import os
    import tempfile

    where = place(loc)
    if not isinstance(where, StorePath):
        return Path(where)
    info = where._info()
    if info.is_file:
        listing = [("", info.size, info.mtime_ns)]
    else:
        listing = sorted((rel, *stat) for rel, stat in where.listing().items())
    if not listing:
        raise CapfleetError(f"{loc}: nothing there (an empty or missing prefix)")
    key = hashlib.sha256(json_bytes([str(where), listing, "times"])).hexdigest()[:32]
    cache = Path(tempfile.gettempdir()) / MIRROR_DIR / key
    named = cache / (where.name or where.authority)

    def fill(tmp: Path) -> None:
        for rel, _, mtime in listing:
            target = tmp / named.name / rel  # rel "" for a single file: the name itself
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((where / rel).read_bytes())
            if mtime is not None:
                os.utime(target, ns=(mtime, mtime))
        (tmp / ".complete").write_bytes(b"")

    node_cache(cache, ".complete", fill)
    return named


def node_cache(cache: Path, ready: str, fill) -> Path:
    """`cache`, made once on this node: unless it holds `ready` already, one process (the
    others wait on node_lock) has `fill(folder)` write a temporary folder beside it, which is
    then renamed into place, so that no reader sees it in part."""
    import os
    import shutil
    import tempfile

    if (cache / ready).is_file():
        return cache
    with node_lock(cache.parent / f".{cache.name}.lock"):
        if (cache / ready).is_file():  # another process of this node made it meanwhile
            return cache
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".tmp-{cache.name[:12]}-"))
        try:
            fill(tmp)
            os.rename(tmp, cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


def json_bytes(value) -> bytes:
    import json

    return json.dumps(value, sort_keys=True, default=str).encode()


def publish(folder: Path, loc: str | StorePath, last: tuple[str, ...] = ("manifest.json",)):
    """Upload every file under a local folder to the store folder `loc`, the files named in
    `last` (a bundle's or model's manifest) after all the others: a reader that finds the
    manifest finds every file it lists."""
    where = place(loc)
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    rel = [p.relative_to(folder).as_posix() for p in files]
    order = sorted(zip(rel, files, strict=True), key=lambda rf: rf[0] in last)
    for name, path in order:
        (where / name).write_bytes(path.read_bytes())


def copy_in_store(src: StorePath, dst: StorePath, last: tuple[str, ...] = ("manifest.json",)):
    """A store folder copied to another place in the same store by the store itself (S3's
    CopyObject: no byte passes through this node), the files named in `last` after the others,
    as `publish` orders them."""
    if src.fs is not dst.fs:
        raise ValueError(f"{src} and {dst} are not in one store")
    for rel in sorted(src.files(), key=lambda r: r in last):
        try:
            src.fs.copy_file((src / rel).path, (dst / rel).path)
        except OSError as e:
            raise _failed("copy", src / rel, e) from None


class staging:  # noqa: N801  used as a context manager, like tempfile's
    """`with staging(loc) as path:` a local path to write to: `loc` itself when local; for a
    store location a temporary one of the same name, published to `loc` when the block ends
    without an error (a folder's files with its manifest last; a file in one upload), then
    removed."""

    def __init__(self, loc, last: tuple[str, ...] = ("manifest.json",)):
        self.where, self.last = place(loc), last
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        import tempfile

        if not isinstance(self.where, StorePath):
            return Path(self.where)
        self.tmp = Path(tempfile.mkdtemp(prefix="capfleet-stage-"))
        return self.tmp / self.where.name

    def __exit__(self, exc_type, *exc) -> None:
        import shutil

        if self.tmp is None:
            return
        try:
            made = self.tmp / self.where.name
            if exc_type is None and made.is_dir():
                publish(made, self.where, self.last)
            elif exc_type is None and made.is_file():
                self.where.write_bytes(made.read_bytes())
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
