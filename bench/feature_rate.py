"""The feature job's rate against the standalone encoder, two ways (VGG16, as the shipped
Flickr8k spec computes its features; random weights, real-sized rehearsal photos).

The reference is the encoder with no Ray, each process on one thread reading, decoding and
encoding its images, in both engines (Keras, and the fp32 LiteRT flatbuffer the feature job
runs): (a) one process alone, the other cores idle, times the cores; (b) one process per core
at once, summed: what the cores deliver together when all of them encode (they share the
memory bus and the last-level cache; on a VM two vCPUs may share a physical core). Each is
measured twice, alternating, and averaged; the faster engine alone sets the target. Then the
feature job (`capfleet.jobs.train.feature_job.compute_features`: a Ray Data job over every CPU) on
the train, dev and test splits of a rehearsal set of CAPFLEET_BENCH_FEATURE_IMAGES photos
(default 3,000), from nothing: the backbone's conversion (once per backbone; a rerun or
another variant finds it cached) and start-up included. Its rate, with and without the
conversion, is compared with both references (the target: >= 0.9 of the reference)."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import write_result

IMAGES = int(os.environ.get("CAPFLEET_BENCH_FEATURE_IMAGES", 3000))
SAMPLE = 64  # images per reference measurement
SPEC = Path(__file__).resolve().parents[1] / "jobs" / "examples" / "flickr8k_vgg16.toml"


class KerasEncoder:
    """The backbone in Keras on one thread, as model/features.py cached_features runs it."""

    def __init__(self, encoder: str, seed: int):
        import tf_keras as keras

        from capfleet.model.encoders import build_encoder, encoder_info
        from capfleet.model.fitting import configure_threads

        configure_threads(1)
        keras.utils.set_random_seed(seed)
        self.info, self.backbone = encoder_info(encoder), build_encoder(encoder, None)

    def features(self, uris: list[str]):
        """As FeatureWorker.features: (features, positions that decoded, the others' reasons)."""
        from capfleet.jobs.train.feature_job import FEATURE_BATCH
        from capfleet.model.features import decode_files, predict_batches

        images, kept, bad = decode_files(uris, self.info.input_size)
        x = np.stack(images)
        return predict_batches(self.backbone, x, FEATURE_BATCH, self.info.preprocess), kept, bad


def engine(name: str, encoder: str, seed: int, model_file: str):
    """The standalone encoder: "keras", or "litert" (the feature job's FeatureWorker)."""
    from capfleet.jobs.train.feature_job import FeatureWorker

    if name == "keras":
        return KerasEncoder(encoder, seed)
    return FeatureWorker(model_file, encoder, 1)


def _encode(how: tuple, uris: list[str], barrier, queue) -> None:
    worker = engine(*how)
    worker.features(uris[:4])  # warm-up
    barrier.wait()  # all processes encode at the same time
    t0 = time.perf_counter()
    worker.features(uris)
    queue.put(len(uris) / (time.perf_counter() - t0))


def _at_once(processes: int, how: tuple, uris: list[str]) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_encode, args=(how, uris, barrier, queue)) for _ in range(processes)
    ]
    for p in procs:
        p.start()
    rates = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return rates


def encoder_rates(how: tuple, uris: list[str], repeats: int = 2) -> dict:
    """Images/s of the standalone encoder: one process alone, and one per core at once."""
    cores = os.cpu_count() or 1
    alone, together = [], []
    for _ in range(repeats):
        alone += _at_once(1, how, uris)
        together.append(sum(_at_once(cores, how, uris)))
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
    from capfleet.compression.export import export_backbone
    from capfleet.jobs.specs import build_pipeline, read_spec
    from capfleet.jobs.train.feature_job import compute_features
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
        flat = str(tmp / "backbone.tflite")  # the reference's own: the job converts its own
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            pool.submit(export_backbone, first.encoder, None, first.seed, flat).result()
        refs = {
            name: encoder_rates((name, first.encoder, first.seed, flat), uris)
            for name in ("keras", "litert")
        }
        print("standalone", refs, flush=True)
        best = max(refs, key=lambda n: refs[n]["alone_x_cores_img_s"])
        ref = refs[best]
        images = sum(len(read_split(str(data), s)) for s in SPLITS)
        with ray_session(None):
            t0 = time.perf_counter()
            convert = compute_features(first, log=print)["convert_seconds"]
            wall = time.perf_counter() - t0
    rate, steady = images / wall, images / (wall - convert)
    write_result(
        "feature_rate",
        {
            "what": __doc__,
            "encoder": first.encoder,
            "images": images,
            "job": {
                "wall_s": round(wall, 1),
                "convert_s": convert,
                "images_per_s": round(rate, 2),
                "images_per_s_without_conversion": round(steady, 2),
            },
            "engine": "litert",
            "standalone": refs,
            "target_engine": best,
            "ratio_to_alone_x_cores": round(rate / ref["alone_x_cores_img_s"], 3),
            "ratio_to_all_cores_at_once": round(rate / ref["all_cores_img_s"], 3),
            "ratio_to_alone_x_cores_without_conversion": round(
                steady / ref["alone_x_cores_img_s"], 3
            ),
            "target": ">= 0.9 of the standalone encoder's rate per core times the cores",
        },
    )
