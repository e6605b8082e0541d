"""Mixed precision, QAT and full int8 as a user would choose between them, and the two int8
quantizers on the large encoders.

1. The shapes model (jobs/examples/train_shapes.toml, 3,000 images) trained with label
   smoothing 0 (plain cross-entropy, where full int8 of the decoder costs BLEU-4) and 0.1 (the
   default): fp32, dynamic, int8, mixed-int8 with 1, 2 and 4 ops kept float, mixed-int16x8
   with 2, and int8:qat-int8, built and scored as `capfleet compress` does (dev and test
   BLEU-4, size, single-batch ms/image), then each bundle's throughput in a real caption job
   (the goal search's own cost measurement, `cost_job`: 2,048 training images in shards of
   256, start-up excluded).
2. The cost search (`minimize = "cost"`, max_delta_bleu4 = 0.02, price 0.05 per CPU-hour)
   given the same candidates, against measuring every candidate by hand (the jobs of 1):
   which bundle each ships, and how many caption jobs each ran.
3. MobileNetV2 and VGG16 encoders (random weights, Flickr8k-sized decoder; CAPFLEET_BENCH_MP_
   ENCODERS picks) made int8 by the TFLite converter and by the LiteRT quantizer, each in a
   process of its own: seconds, the process's peak RSS (and its RSS before converting), bytes,
   SNR of the encoder's output against float on 64 photos; MobileNetV2 also mixed-int8-2.
   Each encoder with the converter's int8 decoder then captions photos in a caption job
   (CAPFLEET_BENCH_MP_JOB_IMAGES, default 256, one shard: one actor on one CPU): images/s.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

from bench.common import shapes_model, write_result

TRIALS = (
    "fp32",
    "dynamic",
    "int8",
    "mixed-int8-1",
    "mixed-int8-2",
    "mixed-int8-4",
    "mixed-int16x8-2",
    "int8:qat-int8",
)
ENCODERS = os.environ.get("CAPFLEET_BENCH_MP_ENCODERS", "mobilenet_v2,vgg16").split(",")
JOB_IMAGES = int(os.environ.get("CAPFLEET_BENCH_MP_JOB_IMAGES", 256))
PRICE = 0.05
BOUND = 0.02


def _job_rate(bundle: Path, data: str, out: Path, sample: int) -> float:
    from capfleet.cluster.connect import ray_session
    from capfleet.jobs.caption.caption_config import CaptionConfig
    from capfleet.jobs.caption.planner import measure_job

    spec = CaptionConfig(bundles=(str(bundle),), input=data, out=str(out))
    with ray_session():
        return round(measure_job(spec, sample).rate, 2)


def _shapes(tmp: Path, smoothing: float) -> dict:
    from capfleet.cluster.connect import ray_session
    from capfleet.compression.goal import Goal
    from capfleet.compression.settings import TrialSettings, slug
    from capfleet.jobs import api
    from capfleet.jobs.compress.compress_config import CompressConfig
    from capfleet.jobs.compress.search import cost_job
    from capfleet.model.modeldir import model_data, read_model_manifest

    model, manifest = _trained(tmp / f"ls{smoothing}", smoothing)
    out = tmp / f"ls{smoothing}" / "compress"
    settings = TrialSettings(threads=1)
    t0 = time.perf_counter()
    api.compress(
        CompressConfig(models=(str(model),), out=str(out), trials=TRIALS, settings=settings),
        log=print,
    )
    trials_s = time.perf_counter() - t0
    data = model_data(model, read_model_manifest(model))
    goal = Goal(
        max_delta_bleu4=BOUND, minimize="cost", price_per_cpu_hour=PRICE, max_trials=len(TRIALS)
    )
    rows = []
    import pyarrow.parquet as pq

    for r in pq.read_table(out / "trials.parquet").to_pylist():
        t0 = time.perf_counter()  # by hand: the search's own cost job, for every candidate
        with ray_session():
            cost = cost_job(Path(r["bundle"]), data, tmp / "jobs" / slug(r["trial"]), goal, None)
        rows.append(
            {
                **{k: r[k] for k in ("trial", "dev_bleu4", "bleu4", "size_mb", "e2e_ms", "wall_s")},
                "job_img_s": cost["job_img_s"],
                "cost_per_million": round(cost["cost_per_million"], 4),
                "job_s": round(time.perf_counter() - t0, 1),
            }
        )
        print(rows[-1], flush=True)
    base = next(r for r in rows if r["trial"] == "fp32:fp32")
    for r in rows:
        r["dev_delta_bleu4"] = round(r["dev_bleu4"] - base["dev_bleu4"], 4)
        r["test_delta_bleu4"] = round(r["bleu4"] - base["bleu4"], 4)
    meeting = [r for r in rows if -r["dev_delta_bleu4"] <= BOUND]
    by_hand = min(meeting, key=lambda r: r["cost_per_million"])
    # the cost search over the same candidates (the budget is the grid: no new trial)
    t0 = time.perf_counter()
    found = api.compress(
        CompressConfig(models=(str(model),), out=str(out), settings=settings, goal=goal),
        log=print,
    )
    search_s = time.perf_counter() - t0
    costs = json.loads((out / "costs.json").read_text())
    return {
        "label_smoothing": smoothing,
        "epochs": len(manifest.get("history", {}).get("loss", [])),
        "trials_s": round(trials_s, 1),
        "trials": rows,
        "search": {
            "goal": f"max_delta_bleu4 = {BOUND}, minimize cost at {PRICE} per CPU-hour",
            "winner": found.winner,
            "jobs_run": len(costs),
            "measured": {k: v["job_img_s"] for k, v in costs.items()},
            "seconds": round(search_s, 1),
        },
        "by_hand": {
            "winner": by_hand["trial"],
            "jobs_run": len(rows),
            "seconds": round(sum(r["job_s"] for r in rows), 1),
        },
    }


def _trained(tmp: Path, smoothing: float) -> tuple[Path, dict]:
    """The shapes model at this label smoothing (CAPFLEET_BENCH_MODEL reuses one for 0.1)."""
    import shutil

    from capfleet.jobs.specs import load_spec
    from capfleet.model import shapes
    from capfleet.model.training import train

    tmp.mkdir(parents=True, exist_ok=True)
    if smoothing == 0.1:
        return shapes_model(tmp)
    from bench.common import SHAPES_SPEC

    data = tmp.parent / "data"
    if not data.exists():
        shapes.generate(data, images=3000, seed=0)
    model_dir = tmp / "small_cnn"
    shutil.rmtree(model_dir, ignore_errors=True)
    cfg = dataclasses.replace(
        load_spec(SHAPES_SPEC), data=str(data), out=str(model_dir), label_smoothing=smoothing
    )
    return model_dir, train(cfg, log=lambda _: None)


def _encoder_child(encoder: str, method: str, photos: list[str], out: str, queue) -> None:
    """One encoder made `method` in this process: seconds, peak RSS, bytes, SNR."""
    import numpy as np
    import tf_keras as keras

    from bench.caption_scale import MAX_LEN, VOCAB
    from capfleet.compression.convert import encoder_to_tflite
    from capfleet.compression.mixed import PartQuantizer, compare, run
    from capfleet.compression.trial import encoder_samples
    from capfleet.model.captioner import Captioner, CaptionerConfig
    from capfleet.model.encoders import build_encoder, encoder_info
    from capfleet.model.images import decode_image, preprocess

    keras.utils.set_random_seed(0)
    info = encoder_info(encoder)
    backbone = build_encoder(encoder, None)
    enc = Captioner(CaptionerConfig(encoder, VOCAB, MAX_LEN)).encoder_model(backbone)
    x = preprocess(
        np.stack([decode_image(Path(p).read_bytes(), (info.input_size,) * 2) for p in photos]),
        info.preprocess,
    )
    samples = encoder_samples(x)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    kept = []
    if method == "converter int8":
        flat = encoder_to_tflite(enc, "int8", samples)
    else:
        float_flat = encoder_to_tflite(enc, "fp32")
        part = PartQuantizer(float_flat, samples())
        if method == "quantizer int8":
            flat = part.quantize_int8()
        else:
            flat, kept = part.mixed_int8(2)
    seconds = time.perf_counter() - t0
    peak = max(  # a large graph converts in a child process of this one
        resource.getrusage(who).ru_maxrss / 1024
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    Path(out).write_bytes(flat)
    float_flat = encoder_to_tflite(enc, "fp32")
    error = compare(run(float_flat, {"image": x}), run(flat, {"image": x}))
    queue.put(
        {
            "encoder": encoder,
            "method": method,
            "seconds": round(seconds, 1),
            "rss_before_mb": round(rss_before),
            "peak_rss_mb": round(peak),
            "bytes": len(flat),
            "float_bytes": len(float_flat),
            **error,
            "kept": [k["node"] for k in kept],
        }
    )


def _encoders(tmp: Path) -> list[dict]:
    from bench.caption_scale import MAX_LEN, VOCAB, make_bundle
    from bench.photos import make_jpegs
    from capfleet.model.bundle import DECODER_FILE, VOCAB_FILE, load_bundle_files, write_bundle

    photos = make_jpegs(tmp / "photos", max(JOB_IMAGES, 64))
    calib = [str(p) for p in photos[:64]]
    rows = []
    ctx = multiprocessing.get_context("spawn")
    for encoder in ENCODERS:
        reference = make_bundle(
            tmp / f"{encoder}-ref",
            encoder,
            "int8",
            [p.read_bytes() for p in photos[:32]],
            VOCAB,
            MAX_LEN,
        )
        manifest, files = load_bundle_files(reference)
        methods = ["converter int8", "quantizer int8"]
        if encoder != "vgg16":  # VGG16's sensitivity pass: 16 ops x the whole network, slow
            methods.append("quantizer mixed-int8-2")
        for method in methods:
            flat = tmp / f"{encoder}-{method.replace(' ', '_')}.tflite"
            queue = ctx.Queue()
            child = ctx.Process(
                target=_encoder_child, args=(encoder, method, calib, str(flat), queue)
            )
            child.start()
            row = queue.get()
            child.join()
            bundle = tmp / f"{encoder}-{method.replace(' ', '_')}-bundle"
            info = {
                k: v
                for k, v in manifest.items()
                if k not in ("files", "size_mb", "gzip_size_mb", "format", "versions", "created")
            }
            write_bundle(
                bundle,
                flat.read_bytes(),
                files[DECODER_FILE],
                _vocab(files[VOCAB_FILE], reference),
                info,
            )
            t0 = time.perf_counter()
            row["job_img_s"] = _job_rate(
                bundle, str(tmp / "photos"), tmp / "jobs" / bundle.name, JOB_IMAGES
            )
            row["job_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(row, flush=True)
    return rows


def _vocab(data: bytes, where: Path):
    from capfleet.model.text import Vocabulary

    return Vocabulary.from_bytes(data, where)


def run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        encoders = _encoders(Path(tmp) / "encoders")
        shapes = [_shapes(Path(tmp), s) for s in (0.0, 0.1)]
    write_result("mixed_precision", {"what": __doc__, "shapes": shapes, "encoders": encoders})
