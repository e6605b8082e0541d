"""The shipped Flickr8k pipeline (jobs/examples/flickr8k_vgg16.toml) at Flickr8k's size on the
embedded Ray: the rehearsal data set (`capfleet data rehearsal`: 8,091 real-sized photos,
~8,000 words; its captions are unrelated to its images, so its BLEU measures nothing: this
benchmark measures scale, not quality) with `weights = "none"` (no network here; the same
spec with imagenet on a machine with network).

The pipeline's steps run one by one, as `capfleet run` runs them, each measured: the VGG16
features (a Ray Data job over every CPU), each variant's training, the compression trials,
the test split captioned; then the same trials again one per CPU at once (the spec runs them
one after another with both CPUs each) for the parallel speed-up at this scale; then a
MobileNetV2 and a ResNet50 variant (features + the same epochs) for the registry. Per stage:
wall seconds, CPU-seconds of every process of the run (from /proc: the driver, Ray's daemons
and workers), the CPUs busy share (CPU-s / (wall x cores)), peak RSS by process kind, disk
used by the feature cache and the bundles. Also the standalone encoder's rate on one core,
for the features' target (>= 0.9 x rate x cores).

The full spec (20 epochs, two learning rates, six trials) needs hours on 2 cores; the
CAPFLEET_BENCH_F8K_* variables shorten it, and the result records what ran:
EPOCHS (default 1), LEARNING_RATES (comma-separated; default the spec's first), TRIALS
(default fp32,int8), IMAGES (default 8091)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq

from bench.common import write_result

SPEC = Path(__file__).resolve().parents[1] / "jobs" / "examples" / "flickr8k_vgg16.toml"
EPOCHS = int(os.environ.get("CAPFLEET_BENCH_F8K_EPOCHS", 1))
RATES = os.environ.get("CAPFLEET_BENCH_F8K_LEARNING_RATES", "")
TRIALS = tuple(os.environ.get("CAPFLEET_BENCH_F8K_TRIALS", "fp32,int8").split(","))
IMAGES = int(os.environ.get("CAPFLEET_BENCH_F8K_IMAGES", 8091))
TICK = os.sysconf("SC_CLK_TCK")


def _kind(cmd: bytes, pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    if b"multiprocessing" in cmd:
        return "standalone encoder (this benchmark's reference, before Ray)"
    if b"FeatureWorker" in cmd or b"_Worker" in cmd:
        return "feature actor"
    if b"CaptionWorker" in cmd:
        return "caption actor"
    if b"capfleet.compression.convert" in cmd:
        return "converter (a child of a trial or an export)"
    if b"export_backbone" in cmd:
        return "backbone converter (the feature job's Ray task)"
    if b"ray::" in cmd or b"default_worker" in cmd:
        return "ray worker"
    return "ray daemons"


class Meter:
    """CPU-seconds and peak RSS of this process and every process below it, sampled."""

    def __init__(self):
        self.root = os.getpid()
        self.cpu: dict[int, float] = {}
        self.peak: dict[str, int] = {}
        self.stage = "set-up"
        self.hwm: dict[int, int] = {}
        self.stage_peak: dict[str, dict] = {}  # stage -> the largest process that grew in it
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _tree(self) -> set[int]:
        parents = {}
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    parents[int(p.name)] = int(
                        (p / "stat").read_text().rsplit(")", 1)[1].split()[1]
                    )
                except (OSError, ValueError, IndexError):
                    pass
        tree, grew = {self.root}, True
        while grew:
            new = {pid for pid, ppid in parents.items() if ppid in tree} - tree
            tree |= new
            grew = bool(new)
        return tree

    def sample(self) -> None:
        for pid in self._tree():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(stat[11]) + int(stat[12])) / TICK
                status = Path(f"/proc/{pid}/status").read_text()
                hwm = next(
                    int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM")
                )
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError, StopIteration):
                continue
            # by its title now: Ray hands an idle worker (ray::IDLE) a task or an actor
            kind = _kind(cmd, pid, self.root)
            self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu)
            self.peak[kind] = max(self.peak.get(kind, 0), hwm * 1024)
            grew, self.hwm[pid] = hwm > self.hwm.get(pid, 0), hwm
            top = self.stage_peak.get(self.stage)
            if grew and kind != "driver" and (top is None or hwm * 1024 > top["bytes"]):
                name = cmd.split(b"\0")[0].decode(errors="replace")[:60]
                self.stage_peak[self.stage] = {"bytes": hwm * 1024, "kind": kind, "process": name}

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self.sample()

    def total_cpu(self) -> float:
        self.sample()
        return sum(self.cpu.values())


def standalone(encoder: str, seed: int, uris: list[str], flat: str) -> dict:
    """The feature encoder alone on one core, in its own process: Keras, and its fp32 LiteRT
    flatbuffer (converted to `flat` first) as the feature job runs it; their images/s and how
    far their features differ."""
    import numpy as np

    from bench.feature_rate import engine
    from capfleet.compression.export import export_backbone
    from capfleet.model.fitting import configure_threads

    configure_threads(1)  # before TensorFlow starts: the conversion below would fix its pools
    export_backbone(encoder, None, seed, flat)
    rates, feats = {}, {}
    for name in ("keras", "litert"):
        worker = engine(name, encoder, seed, flat)
        worker.features(uris[:4])  # warm-up
        t0 = time.perf_counter()
        feats[name] = worker.features(uris)[0]
        rates[name] = len(uris) / (time.perf_counter() - t0)
    return {
        "images": len(uris),
        "keras_img_s_per_core": round(rates["keras"], 2),
        "litert_fp32_img_s_per_core": round(rates["litert"], 2),
        "max_abs_difference": float(np.abs(feats["keras"] - feats["litert"]).max()),
        "max_abs_feature": float(np.abs(feats["keras"]).max()),
    }


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run() -> None:
    from capfleet.cluster.connect import ray_session
    from capfleet.compression.recipes import parse_trial
    from capfleet.compression.settings import slug
    from capfleet.jobs.caption.caption_config import CaptionConfig
    from capfleet.jobs.caption.job import run_caption_job
    from capfleet.jobs.compress.trials import run_compress_job
    from capfleet.jobs.specs import build_pipeline, read_spec
    from capfleet.jobs.train.feature_job import compute_features
    from capfleet.jobs.train.variants import run_train_job
    from capfleet.model import rehearsal
    from capfleet.model.data import SPLITS, read_split
    from capfleet.model.train_config import TrainGrid

    cores = os.cpu_count() or 1
    stages, meter, registry = {}, Meter(), []

    def stage(name: str, fn):
        meter.stage = name
        t0, c0 = time.perf_counter(), meter.total_cpu()
        out = fn()
        wall, cpu = time.perf_counter() - t0, meter.total_cpu() - c0
        stages[name] = {
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "cpus_busy": round(cpu / (wall * cores), 3),
        }
        print(name, stages[name], flush=True)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "rehearsal"
        counts = stage("rehearsal data", lambda: rehearsal.generate(data, images=IMAGES))
        doc = read_spec(SPEC)["pipeline"]
        doc["out"] = str(tmp / "run")
        doc["data"] = {"path": str(data)}
        doc["train"] = {**doc["train"], "weights": "none", "epochs": EPOCHS}
        if RATES:
            doc["grid"] = {"learning_rate": [float(r) for r in RATES.split(",")]}
        else:
            doc["grid"] = {"learning_rate": doc["grid"]["learning_rate"][:1]}
        doc["compress"] = {**doc["compress"], "trials": list(TRIALS)}
        cfg = build_pipeline(doc, str(SPEC))
        first = cfg.train.variants[0]
        # the standalone encoder on one core, for the features' target, in its own process
        sample = [r.uri for r in read_split(str(data), "test")[:32]]
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            flat = str(tmp / "backbone.tflite")  # its own: the feature job converts one too
            engines = pool.submit(standalone, "vgg16", first.seed, sample, flat).result()
        print("standalone", engines, flush=True)
        # the target is set by the faster engine, whichever the feature job runs (LiteRT)
        alone = max(engines["keras_img_s_per_core"], engines["litert_fp32_img_s_per_core"])
        with ray_session(None):
            feats = stage("features", lambda: compute_features(first, log=print))
            feature_images = sum(len(read_split(str(data), s)) for s in SPLITS)
            rate = feature_images / stages["features"]["wall_s"]
            stage("train variants", lambda: run_train_job(cfg.train, log=print))
            variants = [v.out for v in cfg.train.variants]
            compress = dataclasses.replace(cfg.compress, models=tuple(variants[:1]))
            stage("compress trials", lambda: run_compress_job(compress, log=print))
            side = dataclasses.replace(
                compress, out=str(tmp / "run" / "compress-parallel"), cpus_per_trial=1.0
            )
            stage("compress trials, 1 CPU each at once", lambda: run_compress_job(side, log=print))
            names = tuple(parse_trial(t).name for t in cfg.caption.trials)
            bundles = [
                str(Path(compress.out) / "bundles" / Path(variants[0]).name / slug(n))
                for n in names
            ]
            cap = CaptionConfig(
                bundles=tuple(bundles),
                input=str(data),
                out=str(tmp / "run" / "caption"),
                split=cfg.caption.split or "test",
            )
            job = stage("caption test split", lambda: run_caption_job(cap, log=print))
            for enc in ("mobilenet_v2", "resnet50"):
                out = Path(first.out).parent / enc  # beside the first: the same feature cache
                other = dataclasses.replace(first, encoder=enc, out=str(out))
                grid = TrainGrid(out=str(tmp / "run" / "registry"), variants=(other,), names=(enc,))
                stage(f"{enc} variant", lambda g=grid: run_train_job(g, log=print))
                registry.append(pq.read_table(Path(grid.out) / "variants.parquet").to_pylist()[0])
        trials = pq.read_table(Path(compress.out) / "trials.parquet").to_pylist()
        seq_s = stages["compress trials"]["wall_s"]
        par_s = stages["compress trials, 1 CPU each at once"]["wall_s"]
        variants_rows = pq.read_table(Path(cfg.train.out) / "variants.parquet").to_pylist()
        disk = {
            **{
                f"feature_cache_{enc}_mb": round(
                    sum(p.stat().st_size for p in Path(first.feature_cache).glob(f"{enc}-*.npy"))
                    / 1e6,
                    1,
                )
                for enc in ("vgg16", "mobilenet_v2", "resnet50")
            },
            "bundles_mb": round(_du(Path(compress.out) / "bundles") / 1e6, 1),
            "photos_mb": round(_du(data) / 1e6, 1),
        }
    meter.stop.set()
    write_result(
        "flickr8k_scale",
        {
            "what": __doc__,
            "ran": {
                "images": IMAGES,
                "epochs": EPOCHS,
                "learning_rates": [v.learning_rate for v in cfg.train.variants],
                "trials": list(TRIALS),
                "weights": "none",
            },
            "data": counts,
            "stages": stages,
            "features": {
                **feats,
                "images_per_s": round(rate, 2),
                "images_per_s_without_conversion": round(
                    feature_images / (stages["features"]["wall_s"] - feats["convert_seconds"]), 2
                ),
                "engine": "litert",
                "standalone_per_core_img_s": round(alone, 2),
                "engines": engines,
                "target_img_s": round(0.9 * alone * cores, 2),
                "met": rate >= 0.9 * alone * cores,
            },
            "variants": [
                {k: v.get(k) for k in ("variant", "status", "epochs_run", "train_seconds", "error")}
                for v in [*variants_rows, *registry]
            ],
            "trials": [
                {k: t.get(k) for k in ("trial", "status", "size_mb", "e2e_ms", "wall_s", "error")}
                for t in trials
            ],
            "trials_parallel_speedup": round(seq_s / par_s, 2),
            "caption": {"wall_s": job["wall_seconds"], "rows": job["rows"]},
            "peak_rss_mb": {k: round(v / 1e6) for k, v in sorted(meter.peak.items())},
            # per stage, the largest process whose peak grew during it
            "stage_peak_rss_mb": {
                s: {"mb": round(p["bytes"] / 1e6), "kind": p["kind"], "process": p["process"]}
                for s, p in meter.stage_peak.items()
            },
            "disk": disk,
        },
    )
