"""The feature job's rate against the standalone encoder, two ways (VGG16, Keras, as the shipped
Flickr8k spec computes its features; random weights, real-sized rehearsal photos).

The reference is the encoder with no Ray, each process on one thread reading, decoding and
encoding its images: (a) one process alone, the other cores idle, times the cores; (b) one
process per core at once, summed: what the cores deliver together when all of them encode
(they share the memory bus and the last-level cache; on a VM two vCPUs may share a physical
core). Each is measured twice, alternating, and averaged. Then the feature job
(`capfleet.cluster.features.compute_features`: a Ray Data job over every CPU) on the train, dev
and test splits of a rehearsal set of CAPFLEET_BENCH_FEATURE_IMAGES photos (default 3,000), start-up
included; its rate is compared with both references (the target: >= 0.9 of the reference)."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from bench.common import write_result

IMAGES = int(os.environ.get("CAPFLEET_BENCH_FEATURE_IMAGES", 3000))
SAMPLE = 64  # images per reference measurement
SPEC = Path(__file__).resolve().parents[1] / "jobs" / "examples" / "flickr8k_vgg16.toml"


def _encode(encoder: str, seed: int, uris: list[str], barrier, queue) -> None:
    from capfleet.model.features import FeatureWorker

    worker = FeatureWorker(encoder, None, seed, 1)
    worker.features(uris[:4])  # warm-up
    barrier.wait()  # all processes encode at the same time
    t0 = time.perf_counter()
    worker.features(uris)
    queue.put(len(uris) / (time.perf_counter() - t0))


def _at_once(processes: int, encoder: str, seed: int, uris: list[str]) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_encode, args=(encoder, seed, uris, barrier, queue))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    rates = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return rates


def encoder_rates(encoder: str, seed: int, uris: list[str], repeats: int = 2) -> dict:
    """Images/s of the standalone encoder: one process alone, and one per core at once."""
    cores = os.cpu_count() or 1
    alone, together = [], []
    for _ in range(repeats):
        alone += _at_once(1, encoder, seed, uris)
        together.append(sum(_at_once(cores, encoder, seed, uris)))
    one = sum(alone) / len(alone)
    every = sum(together) / len(together)
    return {
        "images": len(uris),
        "alone_img_s": [round(r, 2) for r in alone],
        "all_cores_at_once_img_s": [round(r, 2) for r in together],
        "alone_x_cores_img_s": round(one * cores, 2),
        "all_cores_img_s": round(every, 2),
        "all_cores_vs_alone_x_cores": round(every / (one * cores), 3),
    }


def run() -> None:
    from capfleet.cluster.connect import ray_session
    from capfleet.cluster.features import compute_features
    from capfleet.jobs.specs import build_pipeline, read_spec
    from capfleet.model import rehearsal
    from capfleet.model.data import SPLITS, read_split

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "rehearsal"
        rehearsal.generate(data, images=IMAGES)
        doc = read_spec(SPEC)["pipeline"]
        doc["out"], doc["data"] = str(tmp / "run"), {"path": str(data)}
        doc["train"] = {**doc["train"], "weights": "none"}
        first = build_pipeline(doc, str(SPEC)).train.variants[0]
        uris = [r.uri for r in read_split(str(data), "test")[:SAMPLE]]
        ref = encoder_rates(first.encoder, first.seed, uris)
        print("standalone", ref, flush=True)
        images = sum(len(read_split(str(data), s)) for s in SPLITS)
        with ray_session(None):
            t0 = time.perf_counter()
            compute_features(first, log=print)
            wall = time.perf_counter() - t0
    rate = images / wall
    write_result(
        "feature_rate",
        {
            "what": __doc__,
            "encoder": first.encoder,
            "images": images,
            "job": {"wall_s": round(wall, 1), "images_per_s": round(rate, 2)},
            "standalone": ref,
            "ratio_to_alone_x_cores": round(rate / ref["alone_x_cores_img_s"], 3),
            "ratio_to_all_cores_at_once": round(rate / ref["all_cores_img_s"], 3),
            "target": ">= 0.9 of the standalone encoder's rate per core times the cores",
        },
    )
