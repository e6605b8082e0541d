"""Data readers: each yields ImageRecord(image_id, uri, captions) for a split.

Formats: the Flickr8k layout as distributed, COCO captions JSON (and Karpathy's split files), a
plain folder of images, and a manifest (Parquet or CSV with a path/URI column). A malformed file
is a DataError naming the file and, for line-based files, the line.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from capfleet.model.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "dev", "test")

# Names as distributed (the image folder really is spelt "Flicker8k").
FLICKR_IMAGES_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset")
FLICKR_TOKEN_FILE = "Flickr8k.token.txt"
FLICKR_SPLIT_FILES = {s: f"Flickr_8k.{s}Images.txt" for s in SPLITS}
FLICKR_TEXT_DIR = "Flickr8k_text"  # where the text files sit in some copies


@dataclass(frozen=True)
class ImageRecord:
    """One input image: a stable id, where it is (path or URI) and its reference captions."""

    image_id: str
    uri: str
    captions: tuple[str, ...] = ()


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
        self.root = Path(root)
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

    def records(self) -> list[ImageRecord]:
        """This split's images that exist on disk, with their captions."""
        captions = self.captions()
        on_disk = {p.name for p in self.images_dir.iterdir()}
        out = []
        self.stats = ReadStats()
        for name in self.split_names():
            if name not in on_disk:
                self.stats.missing_images += 1
                if len(self.stats.skipped) < 10:
                    self.stats.skipped.append(name)
                continue
            image_id = name.rsplit(".", 1)[0]
            out.append(
                ImageRecord(image_id, str(self.images_dir / name), tuple(captions.get(name, ())))
            )
        self.stats.records = len(out)
        return out


class CocoReader:
    """COCO captions JSON (`images` + `annotations`) or Karpathy's `dataset_*.json` splits."""

    def __init__(
        self, json_path: str | Path, image_root: str | Path | None = None, split: str | None = None
    ):
        self.json_path = Path(json_path)
        self.image_root = Path(image_root) if image_root else self.json_path.parent
        self.split = split
        self.stats = ReadStats()

    def records(self) -> list[ImageRecord]:
        try:
            data = json.loads(self.json_path.read_text(encoding="utf-8-sig"))
        except OSError as e:
            raise DataError(f"{self.json_path}: cannot read ({e.strerror or e})") from e
        except json.JSONDecodeError as e:
            raise DataError(f"{self.json_path}:{e.lineno}: invalid JSON ({e.msg})") from e
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

    def records(self) -> list[ImageRecord]:
        paths = [
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        ]
        rel = sorted(p.relative_to(self.root).as_posix() for p in paths)
        out = [ImageRecord(r, str(self.root / r)) for r in rel]
        self.stats = ReadStats(records=len(out))
        return out


class PrefixReader:
    """Every image under an object-store prefix or other filesystem URI (s3://bucket/images/,
    gs://..., file:///data/), listed through pyarrow filesystems with the usual credentials;
    id = the key relative to the prefix."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.stats = ReadStats()

    def records(self) -> list[ImageRecord]:
        import pyarrow.fs as pafs

        scheme = self.uri.split("://", 1)[0]
        try:
            filesystem, root = pafs.FileSystem.from_uri(self.uri)
            infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        except (OSError, ValueError) as e:
            raise DataError(f"{self.uri}: cannot list ({e})") from e
        keys = sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File and Path(i.path).suffix.lower() in IMAGE_EXTENSIONS
        )
        root = root.rstrip("/")
        head = "file://" if scheme == "file" else f"{scheme}://"
        out = [ImageRecord(k[len(root) + 1 :], head + k) for k in keys]
        self.stats = ReadStats(records=len(out))
        return out


class ManifestReader:
    """A Parquet or CSV table with a `path` or `uri` column; optional `image_id`/`id` and
    `caption` (one per row, rows of one image grouped) or `captions` (a list per row).

    Relative paths are resolved against the manifest's folder; URIs (scheme://) are kept.
    """

    PATH_COLUMNS = ("path", "uri")
    ID_COLUMNS = ("image_id", "id")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.stats = ReadStats()

    def _table(self):
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        suffix = self.path.suffix.lower()
        try:
            if suffix == ".parquet":
                return pq.read_table(self.path)
            if suffix in (".csv", ".tsv"):
                opts = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
                return pacsv.read_csv(self.path, parse_options=opts)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{self.path}: cannot read manifest ({e})") from e
        raise DataError(f"{self.path}: a manifest must be .parquet, .csv or .tsv")

    def records(self) -> list[ImageRecord]:
        table = self._table()
        cols = table.column_names
        path_col = next((c for c in self.PATH_COLUMNS if c in cols), None)
        if path_col is None:
            raise DataError(
                f"{self.path}: no path column; expected one of {', '.join(self.PATH_COLUMNS)}, "
                f"found {', '.join(cols) or 'none'}"
            )
        id_col = next((c for c in self.ID_COLUMNS if c in cols), None)
        rows = table.to_pylist()
        grouped: dict[str, tuple[str, list[str]]] = {}
        for n, row in enumerate(rows):
            where = f"{self.path}: row {n + 1}"  # data rows, 1-based, header not counted
            raw = row[path_col]
            if raw is None or not str(raw).strip():
                raise DataError(f"{where}: empty {path_col!r}")
            uri = self._resolve(str(raw).strip())
            image_id = str(row[id_col]) if id_col and row[id_col] is not None else str(raw).strip()
            if image_id in grouped and grouped[image_id][0] != uri:
                raise DataError(f"{where}: id {image_id!r} already names {grouped[image_id][0]}")
            caps = grouped.setdefault(image_id, (uri, []))[1]
            if row.get("caption") is not None:
                caps.append(str(row["caption"]).strip())
            if row.get("captions") is not None:
                if not isinstance(row["captions"], list):
                    raise DataError(f"{where}: 'captions' must be a list of strings")
                caps.extend(str(c).strip() for c in row["captions"])
        out = [ImageRecord(i, uri, tuple(caps)) for i, (uri, caps) in grouped.items()]
        self.stats = ReadStats(records=len(out))
        return out

    def _resolve(self, raw: str) -> str:
        if "://" in raw or Path(raw).is_absolute():
            return raw
        return str(self.path.parent / raw)


def open_reader(path: str | Path, split: str | None = None):
    """Pick the reader for a path: Flickr8k directory, folder, COCO JSON or manifest; a URI
    with a scheme (s3://, gs://, file://) is an object-store prefix of images."""
    if isinstance(path, str) and "://" in path:
        return PrefixReader(path)
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
