"""The caption job on a real local Ray: every image once per model, bad ones as error rows,
resume without duplicates."""

import csv
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfleet.core.errors import CapfleetError
from capfleet.jobs.caption.caption_config import CaptionConfig
from capfleet.jobs.caption.job import run_caption_job
from capfleet.jobs.caption.parts import read_captions
from capfleet.model.data import Flickr8kReader


@pytest.fixture(scope="module")
def mixed_manifest(shapes_dir, tmp_path_factory):
    """Good shapes images plus one of every bad kind, listed in a CSV manifest with captions."""
    root = tmp_path_factory.mktemp("mixed")
    good = Flickr8kReader(shapes_dir, "test").records()
    rows = [(r.image_id, r.uri, r.captions[0]) for r in good]
    (root / "empty.jpg").write_bytes(b"")
    data = root / "x.jpg"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "JPEG"
    )
    data.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "notes.jpg").write_text("not a picture")
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # 400 MP declared in a tiny file
    (root / "bomb.png").write_bytes(bomb.getvalue())
    bad = {
        "empty": str(root / "empty.jpg"),
        "truncated": str(root / "x.jpg"),
        "notes": str(root / "notes.jpg"),
        "bomb": str(root / "bomb.png"),
        "missing": f"file://{root}/does-not-exist.jpg",
    }
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "path", "caption"])
        w.writerows(rows + [(i, u, "") for i, u in bad.items()])
    return root / "manifest.csv", len(good), bad


def small_cfg(bundle, data, out, **kw):
    """The shapes train split in shards of 8, batches of 8 (many small shards)."""
    kw = {"split": "train", "shard_size": 8, "batch_size": 8, **kw}
    return CaptionConfig(bundles=(str(bundle),), input=str(data), out=str(out), **kw)


def expected_reason(image_id):
    return {
        "empty": "empty",
        "truncated": "truncated",
        "notes": "not_an_image",
        "bomb": "too_large",
        "missing": "missing",
    }[image_id]


def test_two_bundles_every_image_once_with_error_reasons_and_bleu(
    local_ray, tiny_bundle, second_bundle, mixed_manifest, tmp_path
):
    manifest, n_good, bad = mixed_manifest
    cfg = CaptionConfig(
        bundles=(str(tiny_bundle), str(second_bundle)),
        input=str(manifest),
        out=str(tmp_path / "out"),
        batch_size=4,
        shard_size=5,
    )
    job = run_caption_job(cfg, log=lambda _: None)
    total = n_good + len(bad)
    assert job["rows"] == {"tiny-fp32": total, "tiny-b": total}
    rows = read_captions(tmp_path / "out").to_pylist()
    assert len(rows) == 2 * total
    assert len({(r["model"], r["image_id"]) for r in rows}) == 2 * total  # no duplicates
    # one pool whose actors host both bundles: a shard's rows of both models share a worker
    workers = {(r["shard"], r["worker"]) for r in rows}
    assert len(workers) == len({r["shard"] for r in rows}) == 3
    for r in rows:
        if r["image_id"] in bad:
            assert r["status"] == "error" and r["caption"] is None
            assert r["error"].startswith(expected_reason(r["image_id"])), r
        else:
            assert r["status"] == "ok" and r["error"] is None and r["caption"] is not None
            assert r["latency_ms"] > 0 and 1 <= r["batch_size"] <= 4
    summary = pq.read_table(tmp_path / "out" / "summary.parquet").to_pylist()
    assert [s["model"] for s in summary] == ["tiny-fp32", "tiny-b"]
    for s in summary:
        assert (s["images"], s["ok"], s["failed"]) == (total, n_good, len(bad))
        assert s["bleu1"] is not None and 0 <= s["bleu4"] <= s["bleu1"] <= 1
        assert s["size_mb"] > 0 and s["latency_p95_ms"] >= s["latency_p50_ms"] > 0
    meta = json.loads((tmp_path / "out" / "job.json").read_text())
    assert meta["images"] == total and meta["shards"] == {"total": 3, "run": 3, "failed": 0}
    # the captions folder reads whole with the usual readers, `model` a plain string column
    import pandas as pd

    folder = tmp_path / "out" / "captions"
    frame = pd.read_parquet(folder)
    assert len(frame) == 2 * total and set(frame["model"]) == {"tiny-fp32", "tiny-b"}
    table = pq.read_table(folder)
    assert table.num_rows == 2 * total and table.schema.field("model").type == "string"


def test_rerun_finishes_only_missing_shards(local_ray, tiny_bundle, shapes_dir, tmp_path):
    out = tmp_path / "out"
    cfg = small_cfg(tiny_bundle, shapes_dir, out, shard_size=16)
    run_caption_job(cfg, log=lambda _: None)
    first = read_captions(out).select(["image_id", "caption", "status", "shard"]).to_pylist()
    again = run_caption_job(cfg, log=lambda _: None)
    assert again["shards"]["run"] == 0  # nothing left to do
    summary = pq.read_table(out / "summary.parquet").to_pylist()[0]
    assert summary["throughput_img_s"] is None and summary["images"] == 64
    (out / "captions" / "tiny-fp32" / "part-000002.parquet").unlink()
    again = run_caption_job(cfg, log=lambda _: None)
    assert again["shards"] == {"total": 4, "run": 1, "failed": 0}
    second = read_captions(out).select(["image_id", "caption", "status", "shard"]).to_pylist()
    assert sorted(second, key=str) == sorted(first, key=str)


def test_bad_configuration_is_refused_before_work(tiny_bundle, tmp_path):
    with pytest.raises(CapfleetError, match="batch_size: must be >= 1"):
        CaptionConfig(bundles=(str(tiny_bundle),), input="x", out="y", batch_size=0)
    with pytest.raises(CapfleetError, match="two bundles share a name"):
        CaptionConfig(bundles=(str(tiny_bundle), str(tiny_bundle)), input="x", out="y")
    with pytest.raises(CapfleetError, match="not a capfleet bundle"):
        CaptionConfig(bundles=(str(tmp_path),), input="x", out="y")


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    from capfleet.model import shapes

    root = tmp_path_factory.mktemp("many")
    shapes.generate(root, images=400, seed=3)
    return root


@pytest.mark.slow
def test_resume_after_sigkill_of_the_driver(local_ray, tiny_bundle, many_images, tmp_path):
    """A driver killed with SIGKILL mid-run (its embedded Ray dies with it); the rerun
    captions only what is missing and ends with the same rows as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "capfleet",
        "caption",
        "--bundle",
        str(tiny_bundle),
        "--input",
        str(many_images),
        "--split",
        "train",
        "--out",
        str(out),
        "--shard-size",
        "8",
        "--batch-size",
        "8",
    ]
    proc = subprocess.Popen(
        args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    parts = out / "captions" / "tiny-fp32"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(parts.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None, "the job ended before it could be interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait(timeout=30)
    # a worker in the middle of a rename may still land its part: count once nothing moves
    done_before, still = -1, 0
    while still < 3:
        n = len(list(parts.glob("part-*.parquet")))
        still = still + 1 if n == done_before else 0
        done_before = n
        time.sleep(1)
    assert 3 <= done_before < 40, done_before

    cfg = small_cfg(tiny_bundle, many_images, out)
    meta = run_caption_job(cfg, log=lambda _: None)  # the rerun, on the test's Ray
    assert meta["shards"] == {"total": 40, "run": 40 - done_before, "failed": 0}
    rows = read_captions(out).to_pylist()
    assert len(rows) == 320 and len({r["image_id"] for r in rows}) == 320

    ref = tmp_path / "ref"
    run_caption_job(CaptionConfig(**{**cfg.__dict__, "out": str(ref)}), log=lambda _: None)

    def strip(table):
        keep = ("image_id", "caption", "status", "shard")
        return sorted(({k: r[k] for k in keep} for r in table), key=lambda r: r["image_id"])

    assert strip(rows) == strip(read_captions(ref).to_pylist())


def test_killed_actor_is_restarted_and_the_job_completes(
    local_ray, tiny_bundle, many_images, tmp_path
):
    import os
    import signal
    import threading
    import time

    out = tmp_path / "out"
    cfg = small_cfg(tiny_bundle, many_images, out)
    result: dict = {}

    def run():
        try:
            result.update(run_caption_job(cfg, log=lambda _: None))
        except BaseException as e:  # noqa: BLE001  reported by the assertion below
            result["error"] = e

    job = threading.Thread(target=run)
    job.start()
    parts = out / "captions" / "tiny-fp32"
    deadline = time.time() + 120
    while time.time() < deadline and not list(parts.glob("part-*.parquet")):
        time.sleep(0.1)
    first = sorted(parts.glob("part-*.parquet"))[0]
    worker = read_captions(out).column("worker")[0].as_py()
    pid = int(worker.rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)  # the caption actor this job started
    job.join(timeout=300)
    assert not job.is_alive() and "error" not in result, result.get("error")
    assert result["rows"] == {"tiny-fp32": 320} and first.is_file()
    rows = read_captions(out).to_pylist()
    assert len(rows) == 320 and len({r["image_id"] for r in rows}) == 320
    workers = {r["worker"] for r in rows}
    assert worker in workers and len(workers) >= 2, workers  # a new actor took over


def test_empty_input_and_a_changed_plan_are_refused(local_ray, tiny_bundle, shapes_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CapfleetError, match="no images to caption"):
        run_caption_job(small_cfg(tiny_bundle, tmp_path / "empty", tmp_path / "o1"))
    out = tmp_path / "o2"
    run_caption_job(small_cfg(tiny_bundle, shapes_dir, out), log=lambda _: None)
    with pytest.raises(CapfleetError, match="different shard_size"):
        run_caption_job(small_cfg(tiny_bundle, shapes_dir, out, shard_size=16))
    with pytest.raises(CapfleetError, match="was written with a different images"):
        run_caption_job(small_cfg(tiny_bundle, shapes_dir, out, split="dev"))
    assert read_captions(out).num_rows == 64  # nothing was touched by the refused runs


def test_plain_coco_json_input_is_read_whole(local_ray, tiny_bundle, shapes_dir, tmp_path):
    recs = Flickr8kReader(shapes_dir, "test").records()
    coco = {
        "images": [{"id": i, "file_name": r.uri} for i, r in enumerate(recs)],
        "annotations": [{"image_id": i, "caption": r.captions[0]} for i, r in enumerate(recs)],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    cfg = CaptionConfig(
        bundles=(str(tiny_bundle),),
        input=str(tmp_path / "captions.json"),
        out=str(tmp_path / "out"),
    )
    job = run_caption_job(cfg, log=lambda _: None)
    assert job["rows"] == {"tiny-fp32": len(recs)}
    summary = pq.read_table(tmp_path / "out" / "summary.parquet").to_pylist()[0]
    assert summary["ok"] == len(recs) and summary["bleu1"] is not None


def test_a_small_input_is_cut_into_shards_for_every_cpu(tiny_bundle, shapes_dir, tmp_path):
    from capfleet.jobs.caption.job import MIN_SHARD, SMALL_INPUT_SHARDS, _listing

    uri = Flickr8kReader(shapes_dir, "test").records()[0].uri
    (tmp_path / "m.csv").write_text(
        "image_id,uri\n" + "".join(f"r{i},{uri}\n" for i in range(1000))
    )
    cfg = lambda **kw: CaptionConfig(  # noqa: E731
        bundles=(str(tiny_bundle),), input=str(tmp_path / "m.csv"), out="o", **kw
    )
    # 1,000 images and the default 1,024 per shard: 16 shards of 64, not one of 1,000
    cut = _listing(cfg(), print)
    assert [len(s) for s in cut.shards] == [64] * 15 + [40]
    assert len(cut.shards) == SMALL_INPUT_SHARDS and MIN_SHARD == 64
    assert [i for s in cut.shards for i in s.image_id] == [f"r{i}" for i in range(1000)]
    assert _listing(cfg(), print).identity() == cut.identity()  # a rerun cuts the same
    assert [len(s) for s in _listing(cfg(shard_size=50), print).shards] == [50] * 20  # smaller
    assert [len(s) for s in _listing(cfg(limit=100), print).shards] == [64, 36]
