"""Caption job throughput vs a plain one-process baseline doing the same work on the same images
with no Ray (decode + preprocess on a 2-thread pool, BundleRunner with 2 threads on full batches).
Also: the bundle alone on preloaded batches (the model-bound limit), 1 vs 2 actors, and the
resident memory of each caption actor. Small-CNN fp32 and VGG16 int8 bundles with random
weights (speed does not depend on what the weights learnt; every caption runs to full length,
the worst case); 128x128 shapes JPEGs, resized to each encoder's input."""

from __future__ import annotations

import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import Timer, write_result

IMAGES = 3000  # distinct shapes JPEGs (128x128)
# The manifest lists each image many times under different ids. At ~1,000 images/s the small
# CNN's 120,000 rows take two minutes: a job long enough that its fixed start-up (~15 s on
# 2 cores) is a small part of it, as it is for the millions of images the tool is for.
SMALL_ROWS = 120_000
VGG16_ROWS = 600  # VGG16 int8 runs ~6 img/s on this AVX2-only CPU: 600 rows, once each
BATCH = 256
SHARD = 1024


def make_bundle(out: Path, vocab) -> Path:
    import tf_keras as keras

    from capfleet.compression.convert import encoder_to_tflite, step_to_tflite
    from capfleet.model.bundle import write_bundle
    from capfleet.model.captioner import Captioner, CaptionerConfig
    from capfleet.model.encoders import encoder_section

    keras.utils.set_random_seed(0)
    cap = Captioner(CaptionerConfig("small_cnn", len(vocab), 16, embed_dim=64))
    write_bundle(
        out,
        encoder_to_tflite(cap.encoder_model()),
        step_to_tflite(cap.step_model(), 256),
        vocab,
        {
            "name": "small_cnn-fp32",
            "recipe": {"encoder": "fp32", "decoder": "fp32"},
            "quantizer": "none",
            "config": cap.config.to_dict(),
            "encoder": encoder_section("small_cnn", "none"),
            "source_model": {},
        },
    )
    return out


def baseline(bundle: Path, uris: list[str]) -> float:
    """One process, no Ray: a 2-thread decode pool feeding full batches to the bundle."""
    from capfleet.model.bulk.reader import read_uri
    from capfleet.model.bundle import BundleRunner
    from capfleet.model.images import decode_image

    runner = BundleRunner(bundle, num_threads=2)
    size = runner.image_size

    def load(u):
        return decode_image(read_uri(u), size)

    with Timer() as t, ThreadPoolExecutor(2) as pool:
        batches = [uris[i : i + BATCH] for i in range(0, len(uris), BATCH)]
        nxt = pool.map(load, batches[0])
        for i in range(len(batches)):
            imgs = np.stack(list(nxt))
            if i + 1 < len(batches):
                nxt = pool.map(load, batches[i + 1])  # decode the next batch meanwhile
            runner.caption(imgs)
    return len(uris) / t.seconds


def bundle_alone(bundle: Path, uris: list[str], n: int = 1024) -> float:
    from capfleet.model.bulk.reader import read_uri
    from capfleet.model.bundle import BundleRunner
    from capfleet.model.images import decode_image

    runner = BundleRunner(bundle, num_threads=2)
    imgs = np.stack([decode_image(read_uri(u), runner.image_size) for u in uris[:n]])
    runner.caption(imgs[:BATCH])
    with Timer() as t:
        for i in range(0, len(imgs), BATCH):
            runner.caption(imgs[i : i + BATCH])
    return len(imgs) / t.seconds


def actor_rss_sampler(stop: threading.Event, peak: dict) -> None:
    """Peak resident memory of every caption actor process, read from /proc twice a second."""
    while not stop.is_set():
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if "CaptionWorker" not in cmd:
                    continue
                for line in (proc / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                        peak[proc.name] = max(peak.get(proc.name, 0), rss)
            except (OSError, ValueError):
                pass
        stop.wait(0.5)


def steady_rate(done: list[tuple[float, int]], shard: int, rows: int) -> float:
    """Images/s between the first and the last finished shard: the job's rate once Ray, Ray
    Data and the actors have started (`done` holds (time, shard id) per finished shard)."""
    size = lambda i: min(shard, rows - i * shard)  # noqa: E731  the last shard may be short
    (t_first, _), (t_last, _) = done[0], done[-1]
    return sum(size(i) for _, i in done[1:]) / (t_last - t_first)


def job_run(bundle: Path, manifest_csv: Path, rows: int, actors, cpus, tmp: Path, shard: int):
    from capfleet.cluster.caption_config import CaptionConfig
    from capfleet.cluster.caption_pipeline import run_caption_job

    peak: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=actor_rss_sampler, args=(stop, peak))
    sampler.start()
    cfg = CaptionConfig(
        bundles=(str(bundle),),
        input=str(manifest_csv),
        out=str(tmp / f"out-{bundle.name}-{rows}-{actors}-{cpus}"),
        batch_size=min(BATCH, shard),
        shard_size=shard,
        actors=actors,
        actor_cpus=cpus,
        decode_cpus=cpus,
    )
    done: list[tuple[float, int]] = []

    def log(line: str) -> None:
        if m := re.match(r"caption: shard (\d+) done", line):
            done.append((time.perf_counter(), int(m.group(1))))

    t0 = time.perf_counter()
    job = run_caption_job(cfg, log=log)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    steady = steady_rate(done, shard, rows) if len(done) > 1 else None
    return {
        "rows": rows,
        "actors": actors,
        "actor_cpus": cpus,
        "interpreter_threads": max(1, int(cpus)),
        "decode": "fused into the actors",
        "wall_s": round(wall, 1),
        "images_per_s": round(rows / wall, 1),
        "steady_images_per_s": steady and round(steady, 1),
        "ray_start_s": job["ray_start_seconds"],
        "first_shard_done_s": round(done[0][0] - t0, 1),
        "fixed_overhead_s": steady and round(wall - rows / steady, 1),
        "rows_written": job["rows"],
        "actor_rss_mb": sorted(round(v / 1e6) for v in peak.values()),
    }


def compared(run: dict, base: float) -> dict:
    return {
        "vs_baseline": round(run["images_per_s"] / base, 3),
        "steady_vs_baseline": run["steady_images_per_s"]
        and round(run["steady_images_per_s"] / base, 3),
        **run,
    }


def manifest(tmp: Path, name: str, uris: list[str]) -> Path:
    lines = [f"{i},{u}" for i, u in enumerate(uris)]
    path = tmp / f"{name}.csv"
    path.write_text("image_id,path\n" + "\n".join(lines) + "\n")
    return path


def run() -> None:
    from bench.study import KEEP as VGG16_INT8
    from capfleet.model import shapes
    from capfleet.model.data import Flickr8kReader
    from capfleet.model.text import Vocabulary, clean_caption

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shapes.generate(tmp / "data", images=IMAGES + IMAGES // 4 + 2, seed=0)
        recs = Flickr8kReader(tmp / "data", "train").records()[:IMAGES]
        vocab = Vocabulary.build(clean_caption(c) for r in recs for c in r.captions)
        small = make_bundle(tmp / "bundle", vocab)
        # (rows, actors, CPUs per actor): 1 vs 2 actors on the long job, and the same 2-actor
        # job at a quarter of the length, where the fixed start-up weighs four times more
        runs = [(SMALL_ROWS, 1, 1.0), (SMALL_ROWS, 2, 0.5), (SMALL_ROWS, 2, 1.0)]
        runs.append((SMALL_ROWS // 4, 2, 0.5))
        plans = [("small_cnn fp32, random weights", small, SMALL_ROWS, runs, SHARD)]
        if (VGG16_INT8 / "manifest.json").is_file():  # shards of 50: work for both actors
            vgg = ("vgg16 int8 (bench.study), random weights", VGG16_INT8, VGG16_ROWS)
            plans.append((*vgg, [(VGG16_ROWS, 2, 0.5)], 50))
        else:
            print(f"no VGG16 int8 bundle at {VGG16_INT8}: run `python -m bench study` first")
        for what, bundle, rows, sizings, shard in plans:
            uris = ([r.uri for r in recs] * -(-rows // len(recs)))[:rows]
            alone = bundle_alone(bundle, uris, 1024 if rows > 1024 else 256)
            print(what, "bundle alone", round(alone, 1), flush=True)
            # the machine's speed drifts over minutes (a shared VM): the baseline is measured
            # before and after the Ray jobs, and the jobs are compared with the mean
            before = baseline(bundle, uris)
            print(what, "baseline", round(before, 1), flush=True)
            jobs = []
            for n, actors, cpus in sizings:
                csv = manifest(tmp, f"{bundle.name}-{n}", uris[:n])
                jobs.append(job_run(bundle, csv, n, actors, cpus, tmp, shard))
                print(jobs[-1], flush=True)
            after = baseline(bundle, uris)
            print(what, "baseline again", round(after, 1), flush=True)
            base = (before + after) / 2
            results[what] = {
                "bundle_alone_images_per_s": round(alone, 1),
                "baseline_one_process_images_per_s": round(base, 1),
                "baseline_before_and_after": [round(before, 1), round(after, 1)],
                "shard_size": shard,
                "ray_job": [compared(j, base) for j in jobs],
            }
    write_result(
        "caption",
        {
            "what": __doc__,
            "distinct_images": IMAGES,
            "image_side_px": shapes.IMAGE_SIDE,
            "batch": BATCH,
            "bundles": results,
            "target": ">= 0.85 of the baseline on 2 CPUs",
            "fields": {
                "images_per_s": "rows / wall time of the whole job, Ray start-up included",
                "steady_images_per_s": "images/s between the first and the last finished shard",
                "fixed_overhead_s": "wall_s - rows / steady rate: Ray and Ray Data start-up, "
                "actor start, the first shard's wait, shutdown and summary",
            },
        },
    )
