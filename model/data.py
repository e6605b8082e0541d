"""Data readers: each yields ImageRecord(image_id, uri, captions) for a split.

Formats: the Flickr8k layout as distributed, COCO captions JSON (and Karpathy's split files), a
plain folder of images, and a manifest (Parquet or CSV with a path/URI column). A malformed file
is a DataError naming the file and, for line-based files, the line.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from capfleet.core.errors import CapfleetError, DataError
from capfleet.core.storage import StorePath, is_uri, open_parquet, place, read_parquet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "dev", "test")

# Names as distributed (the image folder really is spelt "Flicker8k").
FLICKR_IMAGES_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset")
FLICKR_TOKEN_FILE = "Flickr8k.token.txt"
FLICKR_SPLIT_FILES = {s: f"Flickr_8k.{s}Images.txt" for s in SPLITS}
FLICKR_TEXT_DIR = "Flickr8k_text"  # where the text files sit in some copies


@dataclass(frozen=True)
class ImageRecord:
    """One input image: a stable id, where it is (path or URI) and its reference captions.

    `error` is a reason known before the image is read (it is listed but missing, its path is
    not text): a caption job writes it as that image's error row; training skips it."""

    image_id: str
    uri: str
    captions: tuple[str, ...] = ()
    error: str = ""
    # (size, mtime in ns) when the listing that found the image gave them (an object store's
    # does), so that record_stats need not list its folder again; None: stat it
    stat: tuple[int, int] | None = field(default=None, compare=False, repr=False)


MISSING = "missing"  # an error reason: the input lists the image, the file is not there
BAD_PATH = "bad_path"  # an error reason: the path is not UTF-8 text


@dataclass
class ReadStats:
    """What a reader skipped, so that nothing is dropped silently."""

    records: int = 0
    missing_images: int = 0  # ids named by the text files with no image on disk
    skipped: list[str] = field(default_factory=list)  # the first few of them, for messages


def _lines(path: Path) -> list[tuple[int, str]]:
    """Numbered, stripped, non-blank lines; tolerates a BOM and CRLF line ends."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return [(n, s.strip()) for n, s in enumerate(text.splitlines(), 1) if s.strip()]


class Flickr8kReader:
    """The Flickr8k layout: Flicker8k_Dataset/, Flickr8k.token.txt and the three split files.

    The text files may sit at the root or in Flickr8k_text/. Ids in the text files with no
    image on disk are skipped and counted in `stats` (real copies have a few).
    """

    def __init__(self, root: str | Path, split: str = "train"):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        self.root = place(root)  # a folder, or an object-store prefix
        self.split = split
        self.images_dir = self._find(FLICKR_IMAGES_DIRS, is_dir=True)
        self.token_file = self._find((FLICKR_TOKEN_FILE,), is_dir=False)
        self.split_file = self._find((FLICKR_SPLIT_FILES[split],), is_dir=False)
        self.stats = ReadStats()

    def _find(self, names: tuple[str, ...], is_dir: bool) -> Path:
        for base in (self.root, self.root / FLICKR_TEXT_DIR):
            for name in names:
                p = base / name
                if p.is_dir() if is_dir else p.is_file():
                    return p
        raise DataError(f"{self.root}: not a Flickr8k directory (no {' or '.join(names)} found)")

    def captions(self) -> dict[str, list[str]]:
        """All captions in the token file, by image file name, in file order."""
        by_image: dict[str, list[str]] = defaultdict(list)
        for n, line in _lines(self.token_file):
            key, sep, caption = line.partition("\t")
            name, hash_, _num = key.partition("#")
            if not sep or not hash_ or not name or not caption.strip():
                raise DataError(
                    f"{self.token_file}:{n}: expected '<image>.jpg#<n><TAB><caption>', "
                    f"got {line[:80]!r}"
                )
            by_image[name].append(caption.strip())
        return by_image

    def split_names(self) -> list[str]:
        """Image file names listed in this split's file, in file order, without repeats."""
        names = []
        for n, line in _lines(self.split_file):
            if "\t" in line or " " in line:
                raise DataError(f"{self.split_file}:{n}: expected one image file name per line")
            names.append(line)
        return list(dict.fromkeys(names))

    def records(self, include_missing: bool = False) -> list[ImageRecord]:
        """This split's images with their captions: those on disk, and with `include_missing`
        those the split lists with no image too (as records whose `error` says so)."""
        captions = self.captions()
        if isinstance(self.images_dir, StorePath):  # one listing gives names, sizes and times
            listed = {k: v for k, v in self.images_dir.listing().items() if "/" not in k}
        else:
            listed = dict.fromkeys(p.name for p in self.images_dir.iterdir())
        out = []
        self.stats = ReadStats()
        for name in self.split_names():
            error = ""
            if name not in listed:
                self.stats.missing_images += 1
                if len(self.stats.skipped) < 10:
                    self.stats.skipped.append(name)
                if not include_missing:
                    continue
                error = f"{MISSING}: listed in {self.split_file.name}, not in {self.images_dir}"
            image_id = name.rsplit(".", 1)[0]
            path = str(self.images_dir / name)
            refs = tuple(captions.get(name, ()))
            stat = listed.get(name, (-1, -1) if error else None)
            out.append(ImageRecord(image_id, path, refs, error, stat))
        self.stats.records = len(out)
        return out


class CocoReader:
    """COCO captions JSON (`images` + `annotations`) or Karpathy's `dataset_*.json` splits."""

    def __init__(
        self, json_path: str | Path, image_root: str | Path | None = None, split: str | None = None
    ):
        self.json_path = place(json_path)  # a local path or a store's URI
        self.image_root = place(image_root) if image_root else self.json_path.parent
        self.split = split
        self.stats = ReadStats()

    def records(self, include_missing: bool = False) -> list[ImageRecord]:
        try:
            data = json.loads(self.json_path.read_text(encoding="utf-8-sig"))
        except OSError as e:
            raise DataError(f"{self.json_path}: cannot read ({e.strerror or e})") from e
        except json.JSONDecodeError as e:
            raise DataError(f"{self.json_path}:{e.lineno}: invalid JSON ({e.msg})") from e
        except UnicodeDecodeError as e:
            raise DataError(
                f"{self.json_path}: not UTF-8 text ({e.reason} at byte {e.start})"
            ) from e
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DataError(f"{self.json_path}: expected a JSON object with an 'images' list")
        if "annotations" in data:
            out = self._coco(data)
        else:
            out = self._karpathy(data)
        self.stats = ReadStats(records=len(out))
        return out

    def _coco(self, data: dict) -> list[ImageRecord]:
        if self.split is not None:
            raise DataError(
                f"{self.json_path}: a COCO captions file has no {self.split!r} split; "
                "use Karpathy's dataset_coco.json for splits"
            )
        caps: dict[object, list[str]] = defaultdict(list)
        for i, ann in enumerate(data["annotations"]):
            try:
                caps[ann["image_id"]].append(str(ann["caption"]).strip())
            except (KeyError, TypeError) as e:
                raise DataError(
                    f"{self.json_path}: annotations[{i}] needs 'image_id' and 'caption'"
                ) from e
        out = []
        for i, img in enumerate(data["images"]):
            try:
                image_id, file_name = img["id"], img["file_name"]
            except (KeyError, TypeError) as e:
                raise DataError(f"{self.json_path}: images[{i}] needs 'id' and 'file_name'") from e
            if not isinstance(file_name, str) or not file_name:
                raise DataError(
                    f"{self.json_path}: images[{i}].file_name must be a file name (a string), "
                    f"got {file_name!r}"
                )
            uri = str(self.image_root / file_name)
            out.append(ImageRecord(str(image_id), uri, tuple(caps.get(image_id, ()))))
        return out

    def _karpathy(self, data: dict) -> list[ImageRecord]:
        # Karpathy's files name the validation split "val" and an extra training pool "restval".
        wanted = {"train": {"train", "restval"}, "dev": {"val"}, "test": {"test"}}
        if self.split is not None and self.split not in wanted:
            raise DataError(f"unknown split {self.split!r}; allowed: {', '.join(SPLITS)}")
        out = []
        for i, img in enumerate(data["images"]):
            try:
                if self.split is not None and img["split"] not in wanted[self.split]:
                    continue
                rel = Path(img.get("filepath", "")) / img["filename"]
                image_id = str(img.get("cocoid", img.get("imgid", Path(img["filename"]).stem)))
                caps = tuple(s["raw"].strip() for s in img.get("sentences", ()))
            except AttributeError as e:  # a `raw` that is not a string
                raise DataError(
                    f"{self.json_path}: images[{i}].sentences: each 'raw' must be a string"
                ) from e
            except (KeyError, TypeError) as e:
                raise DataError(
                    f"{self.json_path}: images[{i}] is neither COCO ('id', 'file_name' with "
                    f"'annotations') nor Karpathy style ('filename', 'split', 'sentences')"
                ) from e
            out.append(ImageRecord(image_id, str(self.image_root / rel), caps))
        return out


class FolderReader:
    """Every image under a folder, recursively, by extension; id = path relative to the folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder")
        self.stats = ReadStats()

    def records(self, include_missing: bool = False) -> list[ImageRecord]:
        # not only regular files: a FIFO or device named like an image becomes an error row
        # (not_a_file) when read, rather than a file silently left out
        paths = [
            p
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()
        ]
        rel = sorted(p.relative_to(self.root).as_posix() for p in paths)
        out = [_path_record(r, str(self.root / r)) for r in rel]
        self.stats = ReadStats(records=len(out))
        return out


def _path_record(image_id: str, uri: str) -> ImageRecord:
    """A record for a file name; one that is not UTF-8 (Python holds its bytes as surrogates,
    which no Parquet string can store) becomes an error record with a readable stand-in."""
    try:
        uri.encode("utf-8")
        return ImageRecord(image_id, uri)
    except UnicodeEncodeError:

        def shown(s):
            return os.fsencode(s).decode("utf-8", errors="backslashreplace")

        return ImageRecord(
            shown(image_id), shown(uri), (), f"{BAD_PATH}: the file name is not UTF-8"
        )


class PrefixReader:
    """Every image under an object-store prefix or other filesystem URI (s3://bucket/images/,
    gs://..., file:///data/), listed through pyarrow filesystems with the usual credentials;
    id = the key relative to the prefix."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.stats = ReadStats()

    def records(self, include_missing: bool = False) -> list[ImageRecord]:
        import pyarrow.fs as pafs

        root = place(self.uri)
        try:
            if isinstance(root, StorePath):  # options in the URI stay on every image's URI
                keys = root.files()
            else:  # file://
                filesystem, base = pafs.LocalFileSystem(), str(Path(root).resolve())
                infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
                keys = [i.path[len(base) + 1 :] for i in infos if i.type == pafs.FileType.File]
        except (OSError, ValueError, CapfleetError) as e:
            raise DataError(f"{self.uri}: cannot list ({e})") from e
        keys = sorted(k for k in keys if Path(k).suffix.lower() in IMAGE_EXTENSIONS)
        if isinstance(root, StorePath):
            out = [ImageRecord(k, str(root / k)) for k in keys]
        else:
            out = [ImageRecord(k, f"file://{Path(root).resolve() / k}") for k in keys]
        self.stats = ReadStats(records=len(out))
        return out


class ManifestReader:
    """A Parquet or CSV table of images: a `path`, `uri` or `url` column (img2dataset's `url`,
    LAION's `URL`: names match in any case, or `image_column` names it); optional
    `image_id`/`id`/`key` (without one, the path or URL is the id: stable across runs), and
    references: `caption` or `text` (one per row, rows of one image grouped; LAION's `TEXT`) or
    `captions` (a list per row), or the column `caption_column` names.

    Every column of a CSV is read as text: ids such as `007`, `1e3` or `NA` stay as written.
    Relative paths are resolved against the manifest's folder; URIs (scheme://) are kept. A row
    whose path is not UTF-8 becomes a record with an error (one bad row, not a bad file).
    """

    PATH_COLUMNS = ("path", "uri", "url")
    ID_COLUMNS = ("image_id", "id", "key")
    CAPTION_COLUMNS = ("caption", "text")  # one reference per row
    LIST_COLUMNS = ("captions",)  # a list of references per row

    def __init__(self, path: str | Path, image_column: str = "", caption_column: str = ""):
        self.path = place(path)  # a local file, or an object (a StorePath)
        self.image_column, self.caption_column = image_column, caption_column
        self.stats = ReadStats()

    def _columns(self, names: list[str]) -> dict[str, str | None]:
        """{role: the column that plays it}, names matched in any case; a column given by name
        must exist."""

        def find(given: str, candidates) -> str | None:
            if given:
                if given not in names:
                    raise DataError(
                        f"{self.path}: no column {given!r}; columns: {', '.join(names) or 'none'}"
                    )
                return given
            lower = {n.lower(): n for n in reversed(names)}
            return next((lower[c] for c in candidates if c in lower), None)

        return {
            "path": find(self.image_column, self.PATH_COLUMNS),
            "id": find("", self.ID_COLUMNS),
            "caption": find(self.caption_column, self.CAPTION_COLUMNS),
            "captions": None if self.caption_column else find("", self.LIST_COLUMNS),
        }

    def _table(self):
        import pyarrow as pa

        suffix = self.path.suffix.lower()
        try:
            if suffix == ".parquet":
                roles = self._columns(open_parquet(self.path).schema_arrow.names)
                return read_parquet(self.path, columns=[c for c in roles.values() if c])
            if suffix in (".csv", ".tsv"):
                return self._csv("\t" if suffix == ".tsv" else ",")
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{self.path}: cannot read manifest ({e})") from e
        raise DataError(f"{self.path}: a manifest must be .parquet, .csv or .tsv")

    def _csv(self, delimiter: str):
        """Every column as bytes (decoded per row below): no type inference, no nulls."""
        import csv

        import pyarrow as pa
        import pyarrow.csv as pacsv

        data = self.path.read_bytes()
        head = data.split(b"\n", 1)[0].decode("utf-8-sig", errors="strict").rstrip("\r\n")
        names = next(csv.reader([head], delimiter=delimiter), [])
        if not names:
            return pa.table({})
        return pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.binary() for n in names},
                null_values=[],
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )

    def records(self, include_missing: bool = False) -> list[ImageRecord]:
        try:
            table = self._table()
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}: the header is not UTF-8 ({e.reason})") from e
        cols = table.column_names
        roles = self._columns(cols)
        path_col, id_col = roles["path"], roles["id"]
        if path_col is None:
            raise DataError(
                f"{self.path}: no path column; expected one of {', '.join(self.PATH_COLUMNS)} "
                f"(any case) or --image-column, found {', '.join(cols) or 'none'}"
            )
        paths = table.column(path_col).to_pylist()
        ids = table.column(id_col).to_pylist() if id_col else [None] * len(paths)
        caption = table.column(roles["caption"]).to_pylist() if roles["caption"] else None
        lists = table.column(roles["captions"]).to_pylist() if roles["captions"] else None
        grouped: dict[str, tuple[str, list[str], str]] = {}
        for n, raw in enumerate(paths):
            where = f"{self.path}: row {n + 1}"  # data rows, 1-based, header not counted
            raw, bad = _text(raw)
            if raw is None or not raw.strip():
                raise DataError(f"{where}: empty {path_col!r}")
            raw = raw.strip()
            image_id, bad_id = _text(ids[n]) if ids[n] is not None else (raw, "")
            error = ""
            if bad or bad_id:  # the id and uri keep a readable stand-in of the bytes
                error = f"{BAD_PATH}: row {n + 1}'s {path_col if bad else id_col} is not UTF-8"
            uri = raw if bad else self._resolve(raw)
            if image_id in grouped and grouped[image_id][0] != uri:
                raise DataError(f"{where}: id {image_id!r} already names {grouped[image_id][0]}")
            caps = grouped.setdefault(image_id, (uri, [], error))[1]
            if caption is not None and caption[n] not in (None, b"", ""):
                caps.append((_text(caption[n])[0] or "").strip())
            if lists is not None and lists[n] is not None:
                if not isinstance(lists[n], list):
                    raise DataError(f"{where}: {roles['captions']!r} must be a list of strings")
                caps.extend(str(c).strip() for c in lists[n])
        out = [ImageRecord(i, uri, tuple(c), err) for i, (uri, c, err) in grouped.items()]
        self.stats = ReadStats(records=len(out))
        return out

    def _resolve(self, raw: str) -> str:
        if "://" in raw or Path(raw).is_absolute():
            return raw
        return str(self.path.parent / raw)


def _text(value) -> tuple[str | None, str]:
    """A manifest cell as text: (text, "") or, for bytes that are not UTF-8, (a readable
    stand-in, "bad")."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), ""
        except UnicodeDecodeError:
            return value.decode("utf-8", errors="backslashreplace"), "bad"
    return (None if value is None else str(value)), ""


def open_reader(
    path: str | Path, split: str | None = None, image_column: str = "", caption_column: str = ""
):
    """Pick the reader for a path: Flickr8k directory, folder, COCO JSON or manifest; a URI
    with a scheme (s3://, gs://, file://) is an object-store prefix of images. The column
    names apply to a manifest only."""
    reader = _reader(path, split)
    if isinstance(reader, ManifestReader):
        reader.image_column, reader.caption_column = image_column, caption_column
    elif image_column or caption_column:
        flag = "--image-column" if image_column else "--caption-column"
        raise DataError(f"{path}: {flag} applies to a manifest (or Parquet of image bytes)")
    return reader


def _reader(path: str | Path, split: str | None):
    if is_uri(path):
        root = place(path)
        if root.suffix.lower() in (".parquet", ".csv", ".tsv"):
            return ManifestReader(path)  # a manifest in an object store
        if root.suffix.lower() == ".json":
            return CocoReader(path, split=split)  # a COCO or Karpathy JSON in an object store
        if (root / FLICKR_TOKEN_FILE).is_file() or (
            root / FLICKR_TEXT_DIR / FLICKR_TOKEN_FILE
        ).is_file():
            return Flickr8kReader(root, split or "test")  # a Flickr8k layout in the store
    if "://" in str(path):  # a prefix of images: an object store's, or file://
        return PrefixReader(str(path))
    p = Path(path)
    if p.is_dir():
        has_tokens = (p / FLICKR_TOKEN_FILE).is_file() or (
            p / FLICKR_TEXT_DIR / FLICKR_TOKEN_FILE
        ).is_file()
        if has_tokens:
            return Flickr8kReader(p, split or "test")
        return FolderReader(p)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.suffix.lower() == ".json":
        return CocoReader(p, split=split)
    if p.suffix.lower() in (".parquet", ".csv", ".tsv"):
        return ManifestReader(p)
    raise DataError(
        f"{p}: cannot tell the format; give a folder, a Flickr8k directory, a COCO .json, "
        "or a .parquet/.csv manifest"
    )


def read_split(data: str, split: str) -> list[ImageRecord]:
    """The captioned images of one split of a training data set.

    Only formats that define splits can train (a Flickr8k layout, Karpathy's split JSON):
    anything else would test on the training images.
    """
    reader = open_reader(data, split)
    if not isinstance(reader, (Flickr8kReader, CocoReader)):
        raise DataError(
            f"{data}: training needs train/dev/test splits: give a Flickr8k-layout directory "
            "or Karpathy's dataset_*.json"
        )
    records = [r for r in reader.records() if r.captions]
    if not records:
        raise DataError(f"{data}: the {split} split has no captioned images")
    return records


def record_stats(records: Sequence[ImageRecord]) -> list[tuple[int, int]]:
    """(size, mtime in ns) of each record's image: a stat per local file; for images in an
    object store one listing per folder that holds them (not a request per image). (-1, -1) for
    an image that is not there."""
    listed: dict[str, dict] = {}
    out = []
    for r in records:
        if r.stat is not None:  # its reader listed it with its size and time
            out.append(r.stat)
        elif is_uri(r.uri):
            where = place(r.uri)
            folder = str(where.parent)
            if folder not in listed:
                listed[folder] = where.parent.listing()
            out.append(listed[folder].get(where.name, (-1, -1)))
        else:
            try:
                st = os.stat(r.uri)
                out.append((st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((-1, -1))
    return out


def data_identity(data: str) -> str:
    """What a training data set is, for knowing when outputs made from it are stale: every
    split's ids, image paths and captions, and each image file's size and mtime. Rewriting the
    data (another shapes seed, an edited token file, replaced photos) changes it; reading it
    costs a stat per image (a listing per folder in a store)."""
    import hashlib

    h = hashlib.sha256()
    splits = {split: read_split(data, split) for split in SPLITS}
    stats = iter(record_stats([r for records in splits.values() for r in records]))
    for split, records in splits.items():
        h.update(f"[{split}]\n".encode())
        for r in records:
            size, mtime = next(stats)
            caps = "\t".join(r.captions)
            h.update(f"{r.image_id}\t{r.uri}\t{size}\t{mtime}\t{caps}\n".encode("utf-8", "replace"))
    return h.hexdigest()
