"""The pure stages of bulk captioning on inputs the tests generate: every format a large image
set comes in, every listed image a row, ids kept exactly, reads capped, BLEU that merges."""

import http.server
import io
import json
import os
import random
import tarfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfleet.cluster.watchdog import OutOfTries, clear_note, end_try, start_try
from capfleet.jobs.caption.fetch import read_http, read_uri, sample_key
from capfleet.jobs.caption.listing import expand_braces, first_images, list_inputs, recut
from capfleet.jobs.caption.load import decode_phase, fetch_phase, load_shard
from capfleet.jobs.caption.parts import BleuStats
from capfleet.jobs.caption.worker import rows_of
from capfleet.model.data import Flickr8kReader, ManifestReader
from capfleet.model.metrics import corpus_bleu_scores


def jpeg(seed: int, fmt: str = "JPEG", size=(40, 30)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def decoded(shard, size=16):
    """load_shard on one shard's item as the pool hands it over."""
    return load_shard(shard.item(), [size])


@pytest.fixture()
def shards_dir(tmp_path):
    """Two WebDataset shards: jpg/png/webp images, txt and json captions, a caption-less
    sample, a sample without an image, keys with dots and folders."""
    d = tmp_path / "wds"
    d.mkdir()
    with tarfile.open(d / "shard-000.tar", "w") as t:
        add(t, "a/s1.jpg", jpeg(1))
        add(t, "a/s1.txt", b"a red square\nanother caption\n")
        add(t, "s2.png", jpeg(2, "PNG"))
        add(t, "s2.json", json.dumps({"captions": ["two", "2"]}).encode())
        add(t, "s3.webp", jpeg(3, "WEBP"))
    with tarfile.open(d / "shard-001.tar", "w") as t:
        add(t, "s4.seg.png", jpeg(4, "PNG"))  # not the image: its extension is seg.png
        add(t, "s4.txt", b"no image here")
        add(t, "s5.jpeg", jpeg(5))
        add(t, "s5.json", json.dumps({"caption": "five"}).encode())
    return d


def test_webdataset_shards_one_row_per_sample_read_as_a_stream(shards_dir):
    assert sample_key("a/b.c.jpg") == ("a/b", "c.jpg")
    listing = list_inputs(str(shards_dir))
    assert [s.image_id for s in listing.shards] == [["a/s1", "s2", "s3"], ["s4", "s5"]]
    assert [s.source for s in listing.shards] == ["tar", "tar"]
    first = decoded(listing.shards[0])
    assert list(first["error"]) == ["", "", ""]
    assert [list(r) for r in first["references"]] == [
        ["a red square", "another caption"],
        ["two", "2"],
        [],
    ]
    assert first["image_16"].shape == (3, 16, 16, 3) and first["image_16"].std() > 0
    second = decoded(listing.shards[1])
    assert second["error"][0].startswith("missing: no jpg/jpeg/png/webp member")
    assert second["error"][1] == "" and list(second["references"][1]) == ["five"]
    # a single tar, a glob, WebDataset's brace notation and a file:// URI name the same shards
    one = list_inputs(str(shards_dir / "shard-001.tar"))
    assert [s.image_id for s in one.shards] == [["s4", "s5"]]
    assert list_inputs(str(shards_dir / "shard-*.tar")).identity() == listing.identity()
    assert expand_braces("x-{08..10}.tar") == ["x-08.tar", "x-09.tar", "x-10.tar"]
    braced = list_inputs(str(shards_dir / "shard-{000..001}.tar"))
    assert braced.identity() == listing.identity()
    uri = list_inputs(f"file://{shards_dir}/shard-*.tar")
    assert [s.image_id for s in uri.shards] == [s.image_id for s in listing.shards]
    assert recut(listing, 1) == listing  # a tar is one shard, at any shard size


def test_parquet_with_image_bytes_by_row_group(tmp_path):
    images = [jpeg(i) for i in range(7)]
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": b, "path": f"p{i}.jpg"} for i, b in enumerate(images[:6])] + [None],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
            "text": [f"caption {i}" for i in range(7)],
        }
    )
    pq.write_table(table, tmp_path / "hf.parquet", row_group_size=3)
    listing = list_inputs(str(tmp_path / "hf.parquet"), shard_size=2)
    # row groups of 3 cut into shards of at most 2: never a shard across row groups
    assert [len(s) for s in listing.shards] == [2, 1, 2, 1, 1]
    ids = [i for s in listing.shards for i in s.image_id]
    assert ids[:6] == [f"p{i}.jpg" for i in range(6)] and ids[6] == "hf.parquet:6"
    out = decoded(listing.shards[1])
    assert list(out["error"]) == [""] and list(out["references"][0]) == ["caption 2"]
    assert decoded(listing.shards[-1])["error"][0].startswith("missing")
    # a job's --limit: the first N rows, the last shard cut within its row group
    first = first_images(listing, 4)
    assert [len(s) for s in first.shards] == [2, 1, 1] and first.images == 4
    assert json.loads(first.shards[-1].item()["where"])["length"] == 1
    assert list(decoded(first.shards[-1])["error"]) == [""]
    # cut again without listing again: the same shards as a fresh listing at that size
    for size in (1, 2, 4):
        again = list_inputs(str(tmp_path / "hf.parquet"), shard_size=size)
        assert recut(list_inputs(str(tmp_path / "hf.parquet"), shard_size=4), size) == again

    # plain binary columns: one is found by itself; two need --image-column
    pq.write_table(
        pa.table({"a": images[:2], "b": images[2:4], "id": ["x", "y"]}), tmp_path / "two.parquet"
    )
    with pytest.raises(Exception, match="choose one with --image-column"):
        list_inputs(str(tmp_path / "two.parquet"))
    chosen = list_inputs(f"file://{tmp_path}/two.parquet", image_column="b")
    assert chosen.shards[0].image_id == ["x", "y"]
    assert decoded(chosen.shards[0])["image_16"].std() > 0


def test_csv_manifest_keeps_ids_as_written_and_a_bad_row_is_its_own_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg(0))
    raw = b"image_id,path\n007,a.jpg\n1e3,a.jpg\nNA,a.jpg\nbad,caf\xe9.jpg\n"
    (tmp_path / "m.csv").write_bytes(raw)
    recs = ManifestReader(tmp_path / "m.csv").records()
    assert [r.image_id for r in recs] == ["007", "1e3", "NA", "bad"]
    assert [r.error for r in recs[:3]] == ["", "", ""]
    assert recs[3].error.startswith("bad_path: row 4's path is not UTF-8")
    listing = list_inputs(str(tmp_path / "m.csv"))
    errors = list(decoded(listing.shards[0])["error"])
    assert errors[:3] == ["", "", ""] and errors[3].startswith("bad_path")
    for size in (1, 3):  # cut again without listing again, as a fresh listing cuts
        assert recut(listing, size) == list_inputs(str(tmp_path / "m.csv"), shard_size=size)


def test_a_flickr8k_image_that_is_missing_is_listed_with_its_reason(tmp_path):
    from tests.model.test_data import make_flickr

    root = make_flickr(tmp_path)
    recs = Flickr8kReader(root, "train").records(include_missing=True)
    assert [r.image_id for r in recs] == ["a", "gone.jpg"]
    assert recs[1].error.startswith("missing: listed in Flickr_8k.trainImages.txt")
    assert [r.image_id for r in Flickr8kReader(root, "train").records()] == ["a"]  # training


def test_reads_are_capped_and_never_block(tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 5000)
    assert str(read_uri(str(big), max_bytes=4096)).startswith("too_large: 5000 bytes")
    assert str(read_uri("/dev/zero")).startswith("not_a_file")
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    assert str(read_uri(str(fifo))).startswith("not_a_file")  # opening it would block
    assert str(read_uri(str(tmp_path / "none.jpg"))).startswith("missing")
    assert str(read_uri(f"file://{tmp_path}/none.jpg")).startswith("missing")


class Server(http.server.ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 for the tests: image, 404, slow, huge, flaky."""

    def __init__(self):
        self.hits: dict = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(h):  # noqa: N805
                self.hits[h.path] = self.hits.get(h.path, 0) + 1
                if h.path == "/slow.jpg":
                    threading.Event().wait(2.0)
                if h.path == "/flaky.jpg" and self.hits[h.path] < 2:
                    return h.send_error(503)
                if h.path in ("/img.jpg", "/slow.jpg", "/flaky.jpg"):
                    body = jpeg(9)
                elif h.path == "/huge.jpg":
                    body = b"x" * 5000
                elif h.path == "/notes.jpg":
                    body = b"not a picture"
                else:
                    return h.send_error(404)
                h.send_response(200)
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture()
def server():
    s = Server()
    yield s
    s.shutdown()
    s.server_close()


def test_shards_decoded_into_kept_arrays_equal_fresh_ones_with_zeros_for_errors(tmp_path):
    """A worker decodes shard after shard into the arrays it keeps: each shard's pixels equal
    a fresh decode's, and an error row is zeros, never the pixels of the shard before."""
    for i in range(5):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i, size=(40 + i, 30)))
    (tmp_path / "5.jpg").write_bytes(b"not a jpeg")
    small, large = list_inputs(str(tmp_path), shard_size=4).shards[::-1]  # 4 and the bad one
    keep: dict = {}
    for shard in (small, large, small):  # the kept arrays grow, then serve a smaller shard
        fresh = decode_phase(fetch_phase(shard.item()), [16, 8])
        kept = decode_phase(fetch_phase(shard.item()), [16, 8], keep=keep)
        assert kept["error"] == fresh["error"]
        for size in (16, 8):
            assert np.shares_memory(kept[f"image_{size}"], keep[size])
            np.testing.assert_array_equal(kept[f"image_{size}"], fresh[f"image_{size}"])
    assert [bool(e) for e in kept["error"]] == [False, True]
    assert not kept["image_16"][1].any() and kept["image_16"][0].any()
    # the model's batches: a view of a shard's rows that run on, a copy of those that do not
    pixels = kept["image_16"]
    assert np.shares_memory(rows_of(pixels, [0, 1]), pixels)
    assert not np.shares_memory(rows_of(pixels, [1, 0]), pixels)
    np.testing.assert_array_equal(rows_of(pixels, [1, 0]), pixels[::-1])


def test_http_fetch_timeouts_retries_caps_and_reasons(server):
    assert read_http(f"{server.url}/img.jpg")[:2] == b"\xff\xd8"
    assert str(read_http(f"{server.url}/nope.jpg")).startswith("http_404")
    assert server.hits["/nope.jpg"] == 1  # a 404 is not retried
    assert read_http(f"{server.url}/flaky.jpg")[:2] == b"\xff\xd8"  # a 503, then fine
    assert server.hits["/flaky.jpg"] == 2
    assert str(read_http(f"{server.url}/huge.jpg", max_bytes=4096)).startswith("too_large")
    assert str(read_http(f"{server.url}/slow.jpg", timeout=0.3)).startswith("timeout")
    assert str(read_http("http://127.0.0.1:9/x.jpg")).startswith("unreachable")


def test_http_manifest_rows_get_their_reasons(tmp_path, server):
    rows = ["img.jpg", "nope.jpg", "notes.jpg"]
    (tmp_path / "m.csv").write_text("uri\n" + "\n".join(f"{server.url}/{r}" for r in rows) + "\n")
    out = decoded(list_inputs(str(tmp_path / "m.csv")).shards[0])
    errors = list(out["error"])
    assert (
        errors[0] == ""
        and errors[1].startswith("http_404")
        and errors[2].startswith("not_an_image")
    )
    assert out["read_ms"][0] > 0 and out["decode_ms"][0] > 0


def test_bleu_statistics_merge_to_nltks_corpus_bleu():
    rng = random.Random(0)
    words = "a red blue green square circle star above below left of large small".split()

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))

    refs = [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(60)]
    hyps = [sentence() for _ in range(60)]
    parts = [BleuStats() for _ in range(4)]
    for i, (r, h) in enumerate(zip(refs, hyps, strict=True)):
        parts[i % 4].add(r, h)
    total = BleuStats()
    for p in parts:
        total.merge(p)
    want = corpus_bleu_scores(refs, hyps)
    got = total.scores()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    lone = BleuStats()
    lone.add(["a b c d"], "x y")  # no matching unigram: 0, as nltk says
    assert lone.scores() == corpus_bleu_scores([["a b c d"]], ["x y"]) == {k: 0.0 for k in want}


def test_a_corrupt_plan_or_an_old_one_is_refused_saying_how_to_recover(tmp_path):
    from capfleet.core.errors import CapfleetError
    from capfleet.jobs.caption.parts import check_plan

    plan = {"shard_size": 4, "images": 1, "inputs_sha256": "x", "beam_width": 1, "bundles": {}}
    (tmp_path / "plan.json").write_text('{"shard_size": 4, "ima')  # a half-written file
    with pytest.raises(CapfleetError, match="plan.json: unreadable.*new --out"):
        check_plan(tmp_path, plan)
    (tmp_path / "plan.json").write_text('{"shard_size": 4, "bundles": {}}')  # capfleet 0.1's
    with pytest.raises(CapfleetError, match="another capfleet version.*new --out"):
        check_plan(tmp_path, plan)


def test_a_shards_tries_are_counted_per_model_by_its_starts(tmp_path):
    # the bound on a poison shard: counted as the worker starts it (a shard queued on an actor
    # that died never started, so it keeps its tries), per model, reset for a fresh job
    for _ in range(2):
        start_try(tmp_path, 7, "int8", tries=2)
    with pytest.raises(OutOfTries, match="started 2 times"):
        start_try(tmp_path, 7, "int8", tries=2)
    start_try(tmp_path, 7, "fp32", tries=2)  # another model's pool has its own count
    start_try(tmp_path, 8, "int8", tries=2)  # and another shard
    clear_note(tmp_path, 7)
    start_try(tmp_path, 7, "int8", tries=1)
    with pytest.raises(OutOfTries):
        start_try(tmp_path, 7, "int8", tries=1)
    end_try(tmp_path, 7, "int8")  # its part was written: the count goes
    start_try(tmp_path, 7, "int8", tries=1)


def test_an_earlier_versions_hive_folders_are_moved_for_resume(tmp_path):
    from capfleet.jobs.caption.parts import part_path, upgrade_layout

    old = tmp_path / "captions" / "model=tiny" / "part-000000.parquet"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"part")
    assert upgrade_layout(tmp_path) == 1
    assert part_path(tmp_path, "tiny", 0).read_bytes() == b"part"
    assert upgrade_layout(tmp_path) == 0


def test_a_folders_fifo_gets_a_row_and_the_jobs_own_output_is_no_input(tmp_path):
    from capfleet.jobs.caption.listing import list_inputs

    root = tmp_path / "photos"
    (root / "out").mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg(1))
    os.mkfifo(root / "b.jpg")
    (root / "out" / "latency.png").write_bytes(jpeg(2, "PNG"))  # a job's output inside it
    ids = lambda listing: {i for s in listing.shards for i in s.image_id}  # noqa: E731
    assert ids(list_inputs(str(root), exclude=str(root / "out"))) == {"a.jpg", "b.jpg"}
    assert "out/latency.png" in ids(list_inputs(str(root)))


def test_url_lists_as_img2dataset_and_laion_write_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from capfleet.core.errors import CapfleetError
    from capfleet.jobs.caption.listing import list_inputs

    def rows(listing):
        return [
            (i, u, tuple(r))
            for s in listing.shards
            for i, u, r in zip(s.image_id, s.uri, s.references, strict=True)
        ]

    # img2dataset's input: url, caption; no id column: the URL is the id (stable)
    (tmp_path / "i2d.csv").write_text("url,caption\nhttp://h/a.jpg,a cat\nhttp://h/b.jpg,a dog\n")
    assert rows(list_inputs(str(tmp_path / "i2d.csv"))) == [
        ("http://h/a.jpg", "http://h/a.jpg", ("a cat",)),
        ("http://h/b.jpg", "http://h/b.jpg", ("a dog",)),
    ]
    # LAION's parquet: URL, TEXT (upper case), more columns beside; strings, not image bytes
    laion = tmp_path / "laion.parquet"
    pq.write_table(
        pa.table({"URL": ["http://h/c.jpg"], "TEXT": ["a car"], "similarity": [0.3]}), laion
    )
    assert rows(list_inputs(str(laion))) == [("http://h/c.jpg", "http://h/c.jpg", ("a car",))]
    # other names, given by the flags
    (tmp_path / "own.csv").write_text("link,alt,key\nhttp://h/d.jpg,a boat,d1\n")
    got = list_inputs(str(tmp_path / "own.csv"), image_column="link", caption_column="alt")
    assert rows(got) == [("d1", "http://h/d.jpg", ("a boat",))]
    with pytest.raises(CapfleetError, match="no column 'nope'"):
        list_inputs(str(tmp_path / "own.csv"), image_column="nope")


def test_latency_percentiles_count_each_model_call_once(tmp_path):
    """A row's latency_ms is its call's time per image, shared by the call's images: the
    summary's percentiles are over calls, not weighed by their batch sizes."""
    from capfleet.jobs.caption.summary import call_latencies

    # one part: a call of 3 images at 2 ms each, an error row, a call of 1 image at 9 ms
    pq.write_table(
        pa.table({"latency_ms": [2.0, 2.0, None, 2.0, 9.0], "batch_size": [3, 3, None, 3, 1]}),
        tmp_path / "a.parquet",
    )
    # another part, whose call happens to take 2 ms per image as well: a call of its own
    pq.write_table(pa.table({"latency_ms": [2.0], "batch_size": [1]}), tmp_path / "b.parquet")
    calls = call_latencies([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    assert sorted(calls.tolist()) == [2.0, 2.0, 9.0]
    assert call_latencies([]).size == 0
