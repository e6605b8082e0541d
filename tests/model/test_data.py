import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfleet.core.errors import DataError
from capfleet.model.data import (
    CocoReader,
    Flickr8kReader,
    FolderReader,
    ImageRecord,
    ManifestReader,
    open_reader,
)


def make_flickr(root, crlf=False, text_dir=False):
    """A tiny Flickr8k copy with the quirks of real ones."""
    images = root / "Flicker8k_Dataset"
    images.mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (images / name).write_bytes(b"jpeg")
    nl = "\r\n" if crlf else "\n"
    token_lines = [
        "a.jpg#0\tA dog runs .",
        "a.jpg#1\tA brown dog runs on grass .",
        "",  # blank lines occur in real copies
        "b.jpg#0\tA girl climbs .",
        "gone.jpg.1#0\tAn id with no image on disk .",  # the real file has such ids
        "c.jpg#0\tTwo birds .",
    ]
    text = root / "Flickr8k_text" if text_dir else root
    text.mkdir(exist_ok=True)
    (text / "Flickr8k.token.txt").write_text(nl.join(token_lines) + nl, newline="")
    (text / "Flickr_8k.trainImages.txt").write_text(
        nl.join(["a.jpg", "gone.jpg.1", ""]), newline=""
    )
    (text / "Flickr_8k.devImages.txt").write_text("b.jpg" + nl, newline="")
    (text / "Flickr_8k.testImages.txt").write_text("c.jpg" + nl, newline="")
    return root


@pytest.mark.parametrize(("crlf", "text_dir"), [(False, False), (True, False), (False, True)])
def test_flickr8k_reader_with_real_copy_quirks(tmp_path, crlf, text_dir):
    root = make_flickr(tmp_path, crlf=crlf, text_dir=text_dir)
    reader = Flickr8kReader(root, "train")
    recs = reader.records()
    assert recs == [
        ImageRecord(
            "a",
            str(root / "Flicker8k_Dataset" / "a.jpg"),
            ("A dog runs .", "A brown dog runs on grass ."),
        )
    ]
    assert reader.stats.missing_images == 1 and reader.stats.skipped == ["gone.jpg.1"]
    assert [r.image_id for r in Flickr8kReader(root, "test").records()] == ["c"]


def test_flickr8k_malformed_token_line_names_file_and_line(tmp_path):
    root = make_flickr(tmp_path)
    (root / "Flickr8k.token.txt").write_text("a.jpg#0\tok caption\na.jpg no tab here\n")
    with pytest.raises(DataError, match=r"Flickr8k.token.txt:2: expected"):
        Flickr8kReader(root, "train").records()


def test_flickr8k_missing_parts_and_bad_split(tmp_path):
    with pytest.raises(DataError, match="not a Flickr8k directory"):
        Flickr8kReader(tmp_path, "train")
    make_flickr(tmp_path)
    with pytest.raises(DataError, match="unknown split 'val'"):
        Flickr8kReader(tmp_path, "val")


def test_coco_captions_json(tmp_path):
    data = {
        "images": [{"id": 7, "file_name": "x.jpg"}, {"id": 9, "file_name": "y.jpg"}],
        "annotations": [
            {"image_id": 7, "caption": "a cat "},
            {"image_id": 7, "caption": "one cat"},
            {"image_id": 9, "caption": "a dog"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(data))
    recs = CocoReader(tmp_path / "captions.json", image_root=tmp_path / "imgs").records()
    assert recs[0] == ImageRecord("7", str(tmp_path / "imgs" / "x.jpg"), ("a cat", "one cat"))
    assert recs[1].captions == ("a dog",)


def test_karpathy_split_json(tmp_path):
    images = [
        {
            "filepath": "val2014",
            "filename": "a.jpg",
            "split": "test",
            "cocoid": 1,
            "sentences": [{"raw": "A man."}],
        },
        {
            "filepath": "train2014",
            "filename": "b.jpg",
            "split": "restval",
            "cocoid": 2,
            "sentences": [{"raw": "A dog."}],
        },
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    test = CocoReader(tmp_path / "dataset_coco.json", split="test").records()
    assert test == [ImageRecord("1", str(tmp_path / "val2014" / "a.jpg"), ("A man.",))]
    train = CocoReader(tmp_path / "dataset_coco.json", split="train").records()
    assert [r.image_id for r in train] == ["2"]


def test_coco_bad_json_is_named(tmp_path):
    (tmp_path / "c.json").write_text('{"images": [\n{"id": 1,}\n]}')
    with pytest.raises(DataError, match=r"c.json:2: invalid JSON"):
        CocoReader(tmp_path / "c.json").records()
    (tmp_path / "d.json").write_text('{"images": [{"id": 1}], "annotations": []}')
    with pytest.raises(DataError, match=r"images\[0\] needs 'id' and 'file_name'"):
        CocoReader(tmp_path / "d.json").records()


def test_folder_reader_recursive_sorted_stable(tmp_path):
    for rel in ("b/z.JPG", "a.png", "b/a.jpeg", "notes.txt", "c/d/e.webp"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    ids = [r.image_id for r in FolderReader(tmp_path).records()]
    assert ids == ["a.png", "b/a.jpeg", "b/z.JPG", "c/d/e.webp"]
    assert all(r.captions == () for r in FolderReader(tmp_path).records())


def test_manifest_parquet_groups_captions_and_resolves_paths(tmp_path):
    table = pa.table(
        {
            "path": ["img/a.jpg", "img/a.jpg", "s3://bucket/b.jpg"],
            "caption": ["one", "two", None],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    recs = ManifestReader(tmp_path / "m.parquet").records()
    assert recs == [
        ImageRecord("img/a.jpg", str(tmp_path / "img" / "a.jpg"), ("one", "two")),
        ImageRecord("s3://bucket/b.jpg", "s3://bucket/b.jpg", ()),
    ]


def test_manifest_csv_with_ids_and_list_captions(tmp_path):
    (tmp_path / "m.csv").write_text("image_id,uri\nx1,/data/a.jpg\nx2,file:///data/b.jpg\n")
    recs = ManifestReader(tmp_path / "m.csv").records()
    assert [(r.image_id, r.uri) for r in recs] == [
        ("x1", "/data/a.jpg"),
        ("x2", "file:///data/b.jpg"),
    ]
    pq.write_table(
        pa.table({"uri": ["/a.jpg"], "captions": [["c1", "c2"]]}), tmp_path / "l.parquet"
    )
    assert ManifestReader(tmp_path / "l.parquet").records()[0].captions == ("c1", "c2")


def test_manifest_errors_name_the_problem(tmp_path):
    (tmp_path / "m.csv").write_text("file,caption\na.jpg,x\n")
    expected = "no path column; expected one of path, uri, url (any case) or --image-column"
    with pytest.raises(DataError, match=re.escape(expected) + ", found file"):
        ManifestReader(tmp_path / "m.csv").records()
    (tmp_path / "n.csv").write_text('path\na.jpg\n""\n')
    with pytest.raises(DataError, match="row 2: empty 'path'"):
        ManifestReader(tmp_path / "n.csv").records()


def test_open_reader_detects_format(tmp_path):
    flickr = make_flickr(tmp_path / "f")
    assert isinstance(open_reader(flickr, "test"), Flickr8kReader)
    (tmp_path / "plain").mkdir()
    assert isinstance(open_reader(tmp_path / "plain"), FolderReader)
    (tmp_path / "c.json").write_text("{}")
    assert isinstance(open_reader(tmp_path / "c.json"), CocoReader)
    (tmp_path / "m.csv").write_text("path\n")
    assert isinstance(open_reader(tmp_path / "m.csv"), ManifestReader)
    with pytest.raises(DataError, match="no such file"):
        open_reader(tmp_path / "missing")


def test_a_uri_prefix_lists_images_through_pyarrow_filesystems(tmp_path):
    from capfleet.model.data import PrefixReader, open_reader

    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.jpg", "a/b/y.PNG", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"data")
    reader = open_reader(f"file://{tmp_path}/a/")
    assert isinstance(reader, PrefixReader)
    recs = reader.records()
    assert [(r.image_id, r.uri) for r in recs] == [
        ("b/y.PNG", f"file://{tmp_path}/a/b/y.PNG"),
        ("x.jpg", f"file://{tmp_path}/a/x.jpg"),
    ]


def test_malformed_coco_and_karpathy_files_are_one_clear_error(tmp_path):
    bad = tmp_path / "latin1.json"
    bad.write_bytes(
        '{"images": [{"id": 1, "file_name": "caf\xe9.jpg"}], "annotations": []}'.encode("latin-1")
    )
    with pytest.raises(DataError, match="latin1.json: not UTF-8 text"):
        CocoReader(bad).records()
    numeric = tmp_path / "n.json"
    numeric.write_text(json.dumps({"images": [{"id": 1, "file_name": 17}], "annotations": []}))
    with pytest.raises(DataError, match=r"images\[0\].file_name must be a file name"):
        CocoReader(numeric).records()
    karpathy = tmp_path / "k.json"
    image = {"filename": "a.jpg", "split": "test", "sentences": [{"raw": 5}]}
    karpathy.write_text(json.dumps({"images": [image]}))
    with pytest.raises(DataError, match=r"images\[0\].sentences: each 'raw' must be a string"):
        CocoReader(karpathy, split="test").records()


def test_a_file_name_that_is_not_utf8_is_an_error_record(tmp_path):
    import os

    (tmp_path / "good.jpg").write_bytes(b"x")
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"), "wb") as f:
        f.write(b"x")
    recs = FolderReader(tmp_path).records()
    assert [r.error for r in recs if r.image_id == "good.jpg"] == [""]
    [bad] = [r for r in recs if r.image_id != "good.jpg"]
    assert bad.error.startswith("bad_path") and bad.image_id == "caf\\xe9.jpg"
    bad.image_id.encode("utf-8")  # storable in a Parquet string column
