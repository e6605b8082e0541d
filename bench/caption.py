"""Caption job throughput vs a plain one-process baseline doing the same work on the same images
with no Ray (decode + preprocess on a 2-thread pool, BundleRunner with 2 threads on full batches).
Also: the bundle alone on preloaded batches (the model-bound limit), 1 vs 2 actors, and the
resident memory of each caption actor. Small-CNN fp32 and VGG16 int8 bundles with random
weights (speed does not depend on what the weights learnt; every caption runs to full length,
the worst case); 128x128 shapes JPEGs, resized to each encoder's input."""

from __future__ import annotations

import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import Timer, write_result

IMAGES = 3000  # distinct shapes JPEGs (128x128)
REPEAT = 10  # the manifest lists each image this many times under different ids: 30,000 rows
VGG16_IMAGES = 600  # VGG16 int8 runs ~6 img/s on this AVX2-only CPU: 600 rows, once each
BATCH = 256
SHARD = 1024


def make_bundle(out: Path, vocab) -> Path:
    import tf_keras as keras

    from compression.convert import encoder_to_tflite, step_to_tflite
    from model.bundle import write_bundle
    from model.captioner import Captioner, CaptionerConfig
    from model.training import encoder_section

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
    from model.bundle import BundleRunner
    from model.captioning import read_uri
    from model.images import decode_image

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
    from model.bundle import BundleRunner
    from model.captioning import read_uri
    from model.images import decode_image

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


def job_runs(
    bundle: Path, manifest_csv: Path, rows: int, base: float, sizings, tmp: Path, shard: int
):
    from cluster.caption_pipeline import run_caption_job
    from model.captioning import CaptionConfig

    jobs = []
    for actors, cpus in sizings:
        peak: dict = {}
        stop = threading.Event()
        sampler = threading.Thread(target=actor_rss_sampler, args=(stop, peak))
        sampler.start()
        cfg = CaptionConfig(
            bundles=(str(bundle),),
            input=str(manifest_csv),
            out=str(tmp / f"out-{bundle.name}-{actors}-{cpus}"),
            batch_size=min(BATCH, shard),
            shard_size=shard,
            actors=actors,
            actor_cpus=cpus,
            decode_cpus=cpus,
        )
        t0 = time.perf_counter()
        job = run_caption_job(cfg, log=lambda _: None)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        ips = rows / wall
        run_s = wall - job["ray_start_seconds"]
        jobs.append(
            {
                "images_per_s_after_ray_start": round(rows / run_s, 1),
                "vs_baseline_after_ray_start": round(rows / run_s / base, 3),
                "ray_start_s": job["ray_start_seconds"],
                "actors": actors,
                "actor_cpus": cpus,
                "interpreter_threads": max(1, int(cpus)),
                "decode": "fused into the actors",
                "images_per_s_incl_startup": round(ips, 1),
                "vs_baseline": round(ips / base, 3),
                "wall_s": round(wall, 1),
                "rows": job["rows"],
                "actor_rss_mb": sorted(round(v / 1e6) for v in peak.values()),
            }
        )
        print(jobs[-1], flush=True)
    return jobs


def manifest(tmp: Path, name: str, uris: list[str]) -> Path:
    lines = [f"{i},{u}" for i, u in enumerate(uris)]
    path = tmp / f"{name}.csv"
    path.write_text("image_id,path\n" + "\n".join(lines) + "\n")
    return path


def run() -> None:
    from bench.study import KEEP as VGG16_INT8
    from model import shapes
    from model.data import Flickr8kReader
    from model.text import Vocabulary, clean_caption

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shapes.generate(tmp / "data", images=IMAGES + IMAGES // 4 + 2, seed=0)
        recs = Flickr8kReader(tmp / "data", "train").records()[:IMAGES]
        vocab = Vocabulary.build(clean_caption(c) for r in recs for c in r.captions)
        small = make_bundle(tmp / "bundle", vocab)
        sizes = ((1, 1.0), (2, 0.5), (2, 1.0))
        plans = [("small_cnn fp32, random weights", small, REPEAT, sizes, SHARD)]
        if (VGG16_INT8 / "manifest.json").is_file():  # shards of 50: work for both actors
            plans.append(
                ("vgg16 int8 (bench.study), random weights", VGG16_INT8, 1, ((2, 0.5),), 50)
            )
        else:
            print(f"no VGG16 int8 bundle at {VGG16_INT8}: run `python -m bench study` first")
        for what, bundle, repeat, sizings, shard in plans:
            uris = [r.uri for r in recs][: (IMAGES if repeat > 1 else VGG16_IMAGES)] * repeat
            csv = manifest(tmp, bundle.name, uris)
            alone = bundle_alone(bundle, uris, 1024 if repeat > 1 else 256)
            print(what, "bundle alone", round(alone, 1), flush=True)
            base = baseline(bundle, uris)
            print(what, "baseline", round(base, 1), flush=True)
            results[what] = {
                "rows": len(uris),
                "bundle_alone_images_per_s": round(alone, 1),
                "baseline_one_process_images_per_s": round(base, 1),
                "shard_size": shard,
                "ray_job": job_runs(bundle, csv, len(uris), base, sizings, tmp, shard),
            }
    write_result(
        "caption",
        {
            "what": __doc__,
            "distinct_images": IMAGES,
            "image_side_px": shapes.IMAGE_SIDE,
            "batch": BATCH,
            "shard_size": SHARD,
            "bundles": results,
            "target": ">= 0.85 of the baseline on 2 CPUs",
        },
    )
