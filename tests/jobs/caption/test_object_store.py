"""The caption job against a real S3 API server (moto, on loopback): every input kind, the
bundle and every output in the store, options in the URI carried to every worker, resume
from what the store holds."""

import csv
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from capfleet.jobs.caption.caption_config import CaptionConfig
from capfleet.jobs.caption.job import run_caption_job
from capfleet.jobs.caption.listing import list_inputs
from capfleet.jobs.caption.load import load_shard
from capfleet.model.data import Flickr8kReader


def _put(s3, key: str, data: bytes) -> str:
    with s3.fs.open_output_stream(f"{s3.bucket}/{key}") as f:
        f.write(data)
    return s3.uri(key)


def test_a_caption_job_reads_and_writes_only_the_object_store(
    local_ray, tiny_bundle, shapes_dir, s3
):
    records = Flickr8kReader(shapes_dir, "train").records()[:24]
    for r in records:
        _put(s3, f"images/{r.image_id}", open(r.uri, "rb").read())
    rows = io.StringIO()
    w = csv.writer(rows)
    w.writerow(["path", "caption"])  # paths relative to the manifest, as a user writes them
    w.writerows([f"images/{r.image_id}", r.captions[0]] for r in records)
    manifest = _put(s3, "train.csv", rows.getvalue().encode())
    s3.upload(tiny_bundle, "bundles/tiny")
    out = s3.uri("runs/caption")
    cfg = CaptionConfig(
        bundles=(s3.uri("bundles/tiny"),), input=manifest, out=out, shard_size=8, batch_size=8
    )
    job = run_caption_job(cfg, log=lambda _: None)

    (model,) = job["rows"]
    assert job["rows"][model] == len(records)
    keys = s3.keys("runs/caption")
    parts = [k for k in keys if k.startswith(f"captions/{model}/part-")]
    assert len(parts) == job["shards"]["total"] >= 2
    for name in ("summary.parquet", "plan.json", "job.json", "gallery.html", "latency.png"):
        assert name in keys, (name, keys)
    assert ".capfleet.lock" not in keys  # released
    assert not [k for k in keys if "_failed/" in k and k.endswith(".tries")]
    # other tools read the captions straight from the store
    table = ds.dataset(f"{s3.bucket}/runs/caption/captions/{model}", filesystem=s3.fs).to_table()
    assert table.num_rows == len(records)
    assert set(table["status"].to_pylist()) == {"ok"}
    assert all(table["caption"].to_pylist())
    assert all("endpoint_override=" in u for u in table["uri"].to_pylist())  # options kept
    assert sorted(len(r) for r in table["references"].to_pylist()) == [1] * len(records)
    summary = pq.read_table(f"{s3.bucket}/runs/caption/summary.parquet", filesystem=s3.fs)
    assert summary["images"].to_pylist() == [len(records)]
    with s3.fs.open_input_stream(f"{s3.bucket}/runs/caption/job.json") as f:
        assert json.loads(f.read())["rows"] == job["rows"]

    # a rerun resumes from what the store holds: nothing to do
    again = run_caption_job(cfg, log=lambda _: None)
    assert again["shards"]["run"] == 0 and again["rows"] == job["rows"]


def test_every_input_kind_lists_and_reads_from_the_store_with_its_options(shapes_dir, s3):
    """A prefix, a tar glob, Parquet of image bytes and a COCO JSON in the store: listed on
    the driver, read as a worker reads them, each URI still naming the store's endpoint."""
    records = Flickr8kReader(shapes_dir, "test").records()[:6]
    blobs = {f"{r.image_id}.jpg": open(r.uri, "rb").read() for r in records}
    for i, data in blobs.items():
        _put(s3, f"prefix/{i}", data)
    for n in range(2):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in list(blobs)[n * 3 : n * 3 + 3]:
                info = tarfile.TarInfo(i)
                info.size = len(blobs[i])
                tar.addfile(info, io.BytesIO(blobs[i]))
        _put(s3, f"tars/shard-{n}.tar", buf.getvalue())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"image_id": list(blobs), "image": list(blobs.values())}), sink)
    _put(s3, "bytes/images.parquet", sink.getvalue().to_pybytes())
    coco = {  # a COCO captions file beside its images (file names relative to it)
        "images": [{"id": n, "file_name": f"prefix/{i}"} for n, i in enumerate(blobs)],
        "annotations": [{"image_id": n, "caption": "a shape"} for n in range(len(blobs))],
    }
    _put(s3, "captions_train.json", json.dumps(coco).encode())

    inputs = {
        "prefix": s3.uri("prefix/"),
        "tars": s3.uri("tars/shard-*.tar"),
        "parquet": s3.uri("bytes/images.parquet"),
        "coco": s3.uri("captions_train.json"),
    }
    for kind, uri in inputs.items():
        listing = list_inputs(uri, shard_size=4)
        assert listing.images == len(blobs), kind
        loaded = [load_shard(s.item(), sizes=[32]) for s in listing.shards]
        errors = [e for item in loaded for e in item["error"]]
        assert errors == [""] * len(blobs), (kind, errors)
        sources = {str(s.item()["source"]) for s in listing.shards}
        for s in listing.shards:
            for u in list(s.uri) + [str(s.item()["source"])]:
                if u.startswith("s3://"):
                    assert "endpoint_override=" in u, (kind, u, sources)


@pytest.mark.slow
def test_compress_reads_its_model_and_data_from_the_store_and_publishes_there(
    local_ray, tiny_model, shapes_dir, s3
):
    from capfleet.compression.records import read_trials
    from capfleet.compression.settings import TrialSettings
    from capfleet.jobs.compress.compress_config import CompressConfig
    from capfleet.jobs.compress.trials import run_compress_job

    model = s3.upload(tiny_model, "models/tiny")
    data = s3.upload(shapes_dir, "data/shapes")
    cfg = CompressConfig(
        models=(model,),
        out=s3.uri("compress"),
        data=data,
        trials=("int8",),
        gallery=4,
        settings=TrialSettings(eval_images=8, bench_batch=8, bench_repeats=1),
    )
    result = run_compress_job(cfg, log=lambda _: None)
    assert result["ok"] == 2 and result["failed"] == 0
    keys = s3.keys("compress")
    for trial in ("fp32_fp32", "int8_int8"):
        bundle = [k for k in keys if k.startswith(f"bundles/tiny/{trial}/")]
        assert sorted(k.rsplit("/", 1)[1] for k in bundle) == [
            "decoder_step.tflite",
            "encoder.tflite",
            "manifest.json",
            "vocab.json",
        ]
    for name in ("trials.parquet", "report.md", "report.png", "gallery.html", "job.json"):
        assert name in keys, (name, keys)
    records = read_trials(cfg.out)
    assert all(r["bundle"].startswith("s3://") for r in records)
    assert all(r["e2e_ms"] > 0 for r in records)
    # a bundle in the store captions straight from it
    from capfleet.model.bundle import check_bundle

    manifest = check_bundle(records[1]["bundle"])
    assert manifest["source_model"]["path"] == model  # the store's, not a node's copy
    captions = pq.read_table(
        f"{s3.bucket}/compress/records/tiny/int8_int8.captions.parquet", filesystem=s3.fs
    )
    assert all(u.startswith(f"s3://{s3.bucket}/data/shapes/") for u in captions["uri"].to_pylist())
    lines: list = []
    run_compress_job(cfg, log=lines.append)  # resume from the records the store holds
    assert "2 of 2 trials already done" in lines[0], lines


@pytest.mark.slow
def test_a_goal_search_publishes_its_choice_in_the_store(local_ray, tiny_model, s3):
    from capfleet.compression.goal import Goal
    from capfleet.compression.settings import TrialSettings
    from capfleet.core.storage import mirror
    from capfleet.jobs import api
    from capfleet.jobs.compress.compress_config import CompressConfig
    from capfleet.model.bundle import check_bundle

    settings = TrialSettings(eval_images=8, bench_batch=8, bench_repeats=1)
    out = s3.uri("search")
    cfg = CompressConfig(
        models=(s3.upload(tiny_model, "models/tiny"),),
        out=out,
        settings=settings,
        gallery=0,
        goal=Goal(max_delta_bleu4=1.0, max_trials=2),  # everything meets: the budget ends it
    )
    done = api.compress(cfg, log=lambda _: None)
    assert done.met is True and done.winner in ("fp32:fp32", "dynamic:dynamic")
    keys = s3.keys("search")
    for name in ("trials.parquet", "choice.md", "choice.json", "best/manifest.json"):
        assert name in keys, (name, keys)
    winner = json.loads(s3.fs.open_input_stream(f"{s3.bucket}/search/choice.json").read())
    assert winner["winner"] == done.winner
    best = s3.uri("search/best")
    check_bundle(mirror(best))  # whole, and it loads

    # a goal nothing meets: the earlier choice is taken away, manifest and all
    impossible = CompressConfig(
        models=cfg.models,
        out=out,
        settings=settings,
        gallery=0,
        goal=Goal(max_delta_bleu4=0.5, max_ms=1e-6, max_trials=2),
    )
    assert api.compress(impossible, log=lambda _: None).met is False
    assert not [k for k in s3.keys("search") if k.startswith("best/")]


@pytest.mark.slow
def test_a_pipeline_whose_every_output_is_in_the_store(local_ray, s3, tmp_path, capsys):
    from capfleet.jobs.cli import main

    spec = tmp_path / "p.toml"
    spec.write_text(
        f"""kind = "pipeline"
[pipeline]
out = "{s3.uri("run")}"
[pipeline.data]
images = 40
[pipeline.train]
units = 16
embed_dim = 8
epochs = 1
patience = 0
threads = 1
[pipeline.compress]
trials = ["int8"]
[pipeline.compress.settings]
bench_repeats = 1
eval_images = 8
[pipeline.caption]
trials = ["int8"]
"""
    )
    assert main(["run", str(spec)]) == 0, capsys.readouterr().err
    keys = s3.keys("run")
    assert "data/capfleet-data.json" in keys and "train/variants.parquet" in keys
    assert "train/base/manifest.json" in keys and "compress/trials.parquet" in keys
    assert "caption/summary.parquet" in keys and "job.json" in keys
    summary = pq.read_table(f"{s3.bucket}/run/caption/summary.parquet", filesystem=s3.fs)
    assert summary["images"].to_pylist() == summary["ok"].to_pylist() != [0]
    assert not [p for p in tmp_path.rglob("*") if p.name != "p.toml"]  # nothing written here


def test_an_output_inside_the_input_prefix_is_not_read_as_input(shapes_dir, s3):
    records = Flickr8kReader(shapes_dir, "test").records()[:3]
    for r in records:
        _put(s3, f"photos/{r.image_id}.jpg", open(r.uri, "rb").read())
    _put(s3, "photos/run1/_thumbs/0123.jpg", b"a thumbnail the job wrote")
    listing = list_inputs(s3.uri("photos/"), exclude=s3.uri("photos/run1"))
    assert listing.images == 3


def test_store_paths_that_cannot_work_are_refused_before_any_work(tiny_model, s3, tmp_path):
    from capfleet.core.artifacts import OutputLock
    from capfleet.core.errors import CapfleetError
    from capfleet.jobs.cli import main

    # a bucket that is not there: one clear error, not a traceback
    missing = s3.uri("x").replace(s3.bucket, "no-such-bucket", 1)
    with pytest.raises(CapfleetError, match="cannot write"):
        OutputLock(missing, "caption job", log=lambda _: None).__enter__()
    # export publishes a bundle into the store
    assert main(["export", str(tiny_model), "--out", s3.uri("bundles/tiny")]) == 0
    assert s3.keys("bundles/tiny") == [
        "decoder_step.tflite",
        "encoder.tflite",
        "manifest.json",
        "vocab.json",
    ]
    assert not [p for p in tmp_path.rglob("*")]
