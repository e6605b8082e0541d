"""core.storage against a real S3 API server (moto, on loopback): paths joined with their
options kept, objects published whole, listing, a store folder copied per node, staging, and
the output lock on a store."""

import os
from pathlib import Path

import pytest

from capfleet.core.artifacts import LOCK_FILE, OutputLock, write_json_atomic
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import StorePath, copy_in_store, mirror, place, read_parquet, staging


def test_a_uri_keeps_its_options_on_every_path_joined_from_it():
    root = place("s3://bucket/run?endpoint_override=127.0.0.1:9000&scheme=http")
    assert isinstance(root, StorePath)
    part = root / "captions" / "m" / "part-000001.parquet"
    assert str(part) == (
        "s3://bucket/run/captions/m/part-000001.parquet"
        "?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert part.name == "part-000001.parquet" and part.stem == "part-000001"
    assert part.parent.parent == root / "captions"
    assert str(place("s3://bucket")) == "s3://bucket" and place("s3://bucket/").key == ""
    assert place("file:///tmp/x").__class__.__name__ == "PosixPath"  # file:// is local
    with pytest.raises(CapfleetError, match="no bucket"):
        place("s3:///key")


def test_objects_list_read_and_glob_by_level(s3):
    root = place(s3.uri("r"))
    for key in ("a/part-1.parquet", "a/part-2.parquet", "a/deeper/part-3.parquet", "b.json"):
        (root / key).write_bytes(key.encode())
    assert [p.name for p in (root / "a").glob("part-*.parquet")] == [
        "part-1.parquet",
        "part-2.parquet",
    ]
    assert [p.key.removeprefix("r/") for p in root.glob("*/part-*.parquet")] == [
        "a/part-1.parquet",
        "a/part-2.parquet",
    ]
    assert (root / "a" / "part-1.parquet").read_bytes() == b"a/part-1.parquet"
    assert (root / "a").is_dir() and (root / "b.json").is_file()
    assert not (root / "nothing").exists()
    (root / "b.json").unlink()
    (root / "b.json").unlink(missing_ok=True)
    assert sorted(root.listing()) == [
        "a/deeper/part-3.parquet",
        "a/part-1.parquet",
        "a/part-2.parquet",
    ]


def test_a_store_folder_is_mirrored_once_and_staging_publishes_the_manifest_last(s3, tmp_path):
    import pyarrow as pa

    from capfleet.core.artifacts import write_parquet_atomic

    target = s3.uri("model")
    with staging(target) as folder:
        assert folder.name == "model" and not str(folder).startswith("s3:")
        folder.mkdir(parents=True)
        (folder / "weights.h5").write_bytes(b"w" * 10)
        write_json_atomic(folder / "manifest.json", {"format": "x"})
    assert s3.keys("model") == ["manifest.json", "weights.h5"]
    copy = mirror(target)
    assert copy.name == "model" and (copy / "weights.h5").read_bytes() == b"w" * 10
    assert mirror(target) == copy  # once per content
    (place(target) / "weights.h5").write_bytes(b"changed")
    assert mirror(target) != copy and (mirror(target) / "weights.h5").read_bytes() == b"changed"
    with pytest.raises(CapfleetError, match="nothing there"):
        mirror(s3.uri("absent"))

    copy_in_store(place(target), place(s3.uri("copy")))  # by the store itself
    assert s3.keys("copy") == s3.keys("model")
    assert (place(s3.uri("copy")) / "weights.h5").read_bytes() == b"changed"

    table = pa.table({"x": [1, 2]})
    write_parquet_atomic(place(s3.uri("t.parquet")), table)
    assert read_parquet(s3.uri("t.parquet")).equals(table)


def test_a_nodes_copy_of_a_store_data_set_keys_its_features_as_the_store_does(s3, shapes_dir):
    from capfleet.model.data import read_split
    from capfleet.model.features import cache_key

    data = s3.upload(shapes_dir, "data/shapes")
    copy = mirror(data)
    stored, copied = read_split(data, "dev"), read_split(str(copy), "dev")
    assert stored[0].uri.startswith("s3://") and not copied[0].uri.startswith("s3://")
    listing = place(data).listing()
    for r in copied:  # each copied file keeps its object's time
        rel = Path(r.uri).relative_to(copy).as_posix()
        assert os.stat(r.uri).st_mtime_ns == listing[rel][1]
    key = cache_key("mobilenet_v2", "none-seed0", stored)
    assert cache_key("mobilenet_v2", "none-seed0", copied) == key
    assert cache_key("mobilenet_v2", "none-seed1", copied) != key
    (place(data) / Path(copied[0].uri).relative_to(copy).as_posix()).write_bytes(b"new")
    again = read_split(data, "dev")  # records hold what their listing said: list again
    assert cache_key("mobilenet_v2", "none-seed0", again) != key  # a rewritten image
    one = place(data) / "Flickr8k.token.txt"  # a single file is mirrored too
    assert mirror(one).read_bytes() == one.read_bytes() and mirror(one).name == one.name


def test_a_store_split_and_its_feature_key_take_one_listing(s3, shapes_dir, monkeypatch):
    """The reader's listing gives each image's size and time: keying the split's features
    lists its folder no second time (Flickr8k's 8,000 images are 8 requests a listing)."""
    from dataclasses import replace

    from capfleet.model.data import read_split
    from capfleet.model.features import cache_key

    data = s3.upload(shapes_dir, "data/shapes")
    calls = []
    for name in ("listing", "iterdir"):
        real = getattr(StorePath, name)
        monkeypatch.setattr(StorePath, name, _counted(real, calls))
    records = read_split(data, "train")
    key = cache_key("mobilenet_v2", "none-seed0", records)
    assert len(calls) == 1, calls
    # the same key as statting each image afresh (a listing per folder)
    fresh = [replace(r, stat=None) for r in records]
    assert cache_key("mobilenet_v2", "none-seed0", fresh) == key and len(calls) == 2


def _counted(real, calls: list):
    def call(self, *args):
        calls.append(str(self))
        return real(self, *args)

    return call


def test_the_lock_on_a_store_refuses_a_second_job_and_is_released(s3):
    out = s3.uri("locked")
    with OutputLock(out, "caption job", log=lambda _: None):
        assert LOCK_FILE in s3.keys("locked")
        with pytest.raises(CapfleetError, match="another caption job is writing here"):
            OutputLock(out, "caption job", log=lambda _: None).__enter__()
    assert LOCK_FILE not in s3.keys("locked")
    # a dead holder's lock (this host, this namespace, a pid that is gone) is taken over
    import json
    import os

    from capfleet.core.artifacts import _host, _namespace

    gone = {"host": _host(), "pid": 2**22 + 7, "token": "old", "namespace": _namespace()}
    assert not os.path.exists(f"/proc/{gone['pid']}")
    (place(out) / LOCK_FILE).write_bytes(json.dumps(gone).encode())
    lines: list = []
    with OutputLock(out, "caption job", log=lines.append):
        pass
    assert any("taking over" in x for x in lines)
