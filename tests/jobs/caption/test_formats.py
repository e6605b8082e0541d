"""The caption job on a real local Ray over the formats big image sets come in (WebDataset
tars, Parquet with image bytes, http(s) URLs), with every listed input a row, per-row timings,
per-model throughput, a quiet console, and capfleet's Ray Data transform in a user's pipeline."""

import json
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from capfleet.jobs.caption.caption_config import CaptionConfig
from capfleet.jobs.caption.job import run_caption_job
from capfleet.jobs.caption.parts import part_stats, parts, read_captions
from capfleet.model.data import Flickr8kReader
from tests.jobs.caption.test_stages import Server, add


def images_of(shapes_dir, split="test"):
    return Flickr8kReader(shapes_dir, split).records()


def caption(bundles, input, out, **kw):
    cfg = CaptionConfig(
        bundles=tuple(str(b) for b in bundles), input=str(input), out=str(out), **kw
    )
    return run_caption_job(cfg, log=lambda _: None)


def test_webdataset_tars_and_parquet_bytes_end_to_end(local_ray, tiny_bundle, shapes_dir, tmp_path):
    recs = images_of(shapes_dir)
    for n in range(2):
        with tarfile.open(tmp_path / f"shard-{n}.tar", "w") as t:
            for r in recs[n * 4 : n * 4 + 4]:
                add(t, f"{r.image_id}.jpg", open(r.uri, "rb").read())
                add(t, f"{r.image_id}.txt", "\n".join(r.captions).encode())
    job = caption([tiny_bundle], tmp_path / "shard-{0..1}.tar", tmp_path / "o1")
    rows = read_captions(tmp_path / "o1").to_pylist()
    assert job["rows"] == {"tiny-fp32": 8} and job["shards"]["total"] == 2
    assert sorted(r["image_id"] for r in rows) == sorted(r.image_id for r in recs)
    assert all(r["status"] == "ok" and len(r["references"]) == 5 for r in rows)
    summary = pq.read_table(tmp_path / "o1" / "summary.parquet").to_pylist()[0]
    assert summary["scored"] == 8 and summary["bleu1"] is not None

    table = pa.table(
        {
            "id": [r.image_id for r in recs],
            "image": [{"bytes": open(r.uri, "rb").read(), "path": r.uri} for r in recs],
            "captions": [list(r.captions) for r in recs],
        }
    )
    pq.write_table(table, tmp_path / "hf.parquet", row_group_size=3)
    job = caption([tiny_bundle], tmp_path / "hf.parquet", tmp_path / "o2", shard_size=2)
    assert job["rows"] == {"tiny-fp32": 8} and job["shards"]["total"] == 5  # 3+3+2 rows
    rows = read_captions(tmp_path / "o2").to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(r.image_id for r in recs)
    assert all(r["status"] == "ok" and r["references"] for r in rows)


def test_http_uris_missing_images_and_per_row_timings(local_ray, tiny_bundle, shapes_dir, tmp_path):
    recs = images_of(shapes_dir)
    server = Server()
    try:
        (tmp_path / "m.csv").write_text(
            f"image_id,uri\n007,{server.url}/img.jpg\n1e3,{server.url}/nope.jpg\nNA,{server.url}/notes.jpg\n"
        )
        caption([tiny_bundle], tmp_path / "m.csv", tmp_path / "o1")
    finally:
        server.shutdown()
        server.server_close()
    rows = {r["image_id"]: r for r in read_captions(tmp_path / "o1").to_pylist()}
    assert sorted(rows) == ["007", "1e3", "NA"]  # ids as written, not 7.0 or 1000.0
    assert rows["007"]["status"] == "ok"
    assert rows["1e3"]["error"].startswith("http_404") and rows["NA"]["error"].startswith(
        "not_an_image"
    )

    # a Flickr8k split that lists an image that is not there: an error row, not silence
    missing = tmp_path / "flickr"
    import shutil

    shutil.copytree(shapes_dir, missing)
    gone = recs[0].uri.replace(str(shapes_dir), str(missing))
    (tmp_path / "flickr" / "Flicker8k_Dataset" / gone.rsplit("/", 1)[1]).unlink()
    job = caption([tiny_bundle], missing, tmp_path / "o2", split="test")
    rows = {r["image_id"]: r for r in read_captions(tmp_path / "o2").to_pylist()}
    assert job["rows"] == {"tiny-fp32": len(recs)}
    assert rows[recs[0].image_id]["error"].startswith("missing: listed in Flickr_8k.testImages.txt")
    ok = [r for r in rows.values() if r["status"] == "ok"]
    for r in ok:
        assert (
            r["read_ms"] > 0 and r["decode_ms"] > 0 and r["encoder_ms"] > 0 and r["decoder_ms"] > 0
        )
        assert abs(r["latency_ms"] - r["encoder_ms"] - r["decoder_ms"]) < 1e-9


def test_each_model_reports_its_own_throughput(
    local_ray, tiny_bundle, second_bundle, shapes_dir, tmp_path
):
    out = tmp_path / "o"
    caption([tiny_bundle, second_bundle], shapes_dir, out, split="train", shard_size=16)
    summary = {s["model"]: s for s in pq.read_table(out / "summary.parquet").to_pylist()}
    for model, s in summary.items():
        stats = [part_stats(p) for p in parts(out, model)]
        span = max(x.finished for x in stats) - min(x.started for x in stats)
        assert s["throughput_img_s"] == 64 / span  # this model's own time, not the job's
        assert s["actor_img_s"] == 64 / sum(x.finished - x.started for x in stats)
        assert s["read_ms"] > 0 and s["encoder_ms"] > 0 and json.loads(s["errors"]) == {}


def test_console_shows_progress_and_ray_noise_goes_to_the_log(tiny_bundle, shapes_dir, tmp_path):
    out = tmp_path / "o"
    args = [sys.executable, "-m", "capfleet", "caption", "--bundle", str(tiny_bundle)]
    args += [
        "--input",
        str(shapes_dir),
        "--split",
        "train",
        "--out",
        str(out),
        "--shard-size",
        "16",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "caption: 64/64 images (100%)" in done.stdout
    assert "img/s" in done.stdout and "throughput_img_s" in done.stdout  # the final table
    noise = ("core_worker", "Token authentication", "WARNING", "Deprecat", "streaming_executor")
    assert not [n for n in noise if n in done.stderr + done.stdout], done.stderr[-2000:]
    assert (out / "capfleet.log").is_file()  # where Ray's messages go


def test_the_ray_data_transform_in_a_users_pipeline(local_ray, tiny_bundle, shapes_dir, tmp_path):
    import capfleet

    recs = images_of(shapes_dir, "train")[:20]
    data = [open(r.uri, "rb").read() for r in recs] + [b"not an image"]
    pq.write_table(
        pa.table({"key": [r.image_id for r in recs] + ["bad"], "bytes": data}),
        tmp_path / "in.parquet",
    )
    ray = local_ray
    ds = ray.data.read_parquet(str(tmp_path / "in.parquet"))
    ds = ds.map_batches(
        capfleet.CaptionTransform,
        fn_constructor_kwargs={"bundle": str(tiny_bundle)},
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
        batch_size=8,
    )
    ds.drop_columns(["bytes"]).write_parquet(str(tmp_path / "out"))
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert len(rows) == 21
    assert rows["bad"]["status"] == "error" and rows["bad"]["error"].startswith("not_an_image")
    good = [r for k, r in rows.items() if k != "bad"]
    assert all(r["status"] == "ok" and r["caption"] and r["latency_ms"] > 0 for r in good)


def test_scores_gallery_and_latency_plot_of_a_caption_job(
    local_ray, tiny_bundle, second_bundle, shapes_dir, tmp_path
):
    from capfleet.model.metrics import cider_d
    from capfleet.model.text import clean_caption
    from tests.jobs.test_gallery import _chromium

    out = tmp_path / "o"
    job = caption([tiny_bundle, second_bundle], shapes_dir, out, split="train", gallery=5)
    assert {p.rsplit("/", 1)[1] for p in job["reports"]} == {"gallery.html", "latency.png"}
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = {s["model"]: s for s in pq.read_table(out / "summary.parquet").to_pylist()}
    for model, s in summary.items():
        rows = [r for r in read_captions(out, model).to_pylist() if r["status"] == "ok"]
        refs = [[clean_caption(c) for c in r["references"]] for r in rows]
        assert s["cider_d"] == cider_d(refs, [r["caption"] for r in rows])[0]
        assert abs(s["rouge_l"] - sum(r["rouge_l"] for r in rows) / len(rows)) < 1e-12
        assert all(0 <= r["sentence_bleu4"] <= 1 for r in rows)
    page = (out / "gallery.html").read_text()
    sampled = [
        i for i in {r["image_id"] for r in read_captions(out).to_pylist()} if f">{i}<" in page
    ]
    assert sampled, "no sampled image id on the page"
    dom = _chromium(tmp_path, (out / "gallery.html").as_uri(), "--dump-dom").stdout
    rows = [r for r in read_captions(out).to_pylist() if r["image_id"] == sampled[0]]
    assert {r["model"] for r in rows} == {"tiny-fp32", "tiny-b"}
    for r in rows:  # every model's caption of a sampled image, as the browser built the page
        assert r["caption"] in dom
