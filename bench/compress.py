"""Compression trials on the embedded data set: the small-CNN model trained by
jobs/examples/train_shapes.toml (3,000 images, seed 0), then fp32, dynamic, int8, qat-int8,
prune-50+int8, shrink-50+int8 (also of each part alone, to see which part loses what) and
shrink-25+int8 as Ray tasks (1 CPU each: two at once on 2 cores), each bundle timed alone at
batch 32 with 1 thread. Then the same trials one after
another (one task at a time with both CPUs) for the parallel speed-up, same machine, same run.
Then the trials that fine-tune towards a target (qat-int8, shrink-50+int8) again with other
fine-tuning seeds, to show how far a target result depends on the seed.
CAPFLEET_BENCH_MODEL=DIR reuses a model trained by that spec on that data instead."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from bench.common import RESULTS, Timer, shapes_model, write_result

TRIALS = (
    "fp32",
    "dynamic",
    "int8",
    "qat-int8",
    "prune-50+int8",
    "shrink-50+int8",
    "shrink-50+int8:int8",
    "int8:shrink-50+int8",
    "shrink-25+int8",
)
SEEDED = ("qat-int8", "shrink-50+int8")  # rerun with these fine-tuning seeds (0 is the above)
SEEDS = (1, 2)


def run() -> None:
    from capfleet.compression.records import read_trials
    from capfleet.compression.settings import TrialSettings
    from capfleet.jobs.compress.compress_config import CompressConfig
    from capfleet.jobs.compress.trials import run_compress_job

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, manifest = shapes_model(tmp)
        runs = {}
        for mode, cpus in (("parallel", 1.0), ("sequential", 2.0)):
            job = CompressConfig(
                models=(str(model_dir),), out=str(tmp / mode), trials=TRIALS, cpus_per_trial=cpus
            )
            with Timer() as t:
                run_compress_job(job)
            runs[mode] = round(t.seconds, 1)
            print(mode, runs[mode], flush=True)
        seeded = {}
        for seed in SEEDS:
            out = tmp / f"seed-{seed}"
            settings = TrialSettings(seed=seed)
            job = CompressConfig(
                models=(str(model_dir),), out=str(out), trials=SEEDED, settings=settings
            )
            run_compress_job(job)
            seeded[seed] = {r["trial"]: r for r in read_trials(out)}
            failed = [t for t, r in seeded[seed].items() if r["status"] != "ok"]
            if failed:
                raise RuntimeError(f"seed {seed}: trials failed: {failed}")
        rows = read_trials(tmp / "parallel")
        shutil.copy(tmp / "parallel" / "report.md", RESULTS / "compress_report.md")
        shutil.copy(tmp / "parallel" / "report.png", RESULTS / "compress_report.png")
    keep = (
        "trial",
        "size_mb",
        "gzip_mb",
        "encoder_ms",
        "decoder_ms",
        "e2e_ms",
        "bleu1",
        "bleu4",
        "content_accuracy",
        "size_ratio",
        "speedup",
        "delta_bleu4",
        "encoder_sparsity",
        "decoder_sparsity",
        "wall_s",
        "status",
        "error",
    )
    by = {r["trial"]: r for r in rows}
    fp32, int8, qat = by["fp32:fp32"], by["int8:int8"], by["int8:qat-int8"]
    shrink = by["shrink-50+int8:shrink-50+int8"]
    shrink25 = by["shrink-25+int8:shrink-25+int8"]
    spread = {
        trial: {
            "seed_0": by[trial]["delta_bleu4"],
            **{f"seed_{s}": seeded[s][trial]["delta_bleu4"] for s in SEEDS},
        }
        for trial in ("int8:qat-int8", "shrink-50+int8:shrink-50+int8")
    }
    write_result(
        "compress",
        {
            "what": __doc__,
            "model": {
                "spec": manifest["train"],
                "test_metrics": manifest["test_metrics"],
                "train_seconds": manifest["train_seconds"],
            },
            "settings": dataclasses.asdict(TrialSettings()),  # seed 0 (the reruns: SEEDS)
            "trials": [{k: r.get(k) for k in keep} for r in rows],
            "wall_s": runs,
            "parallel_speedup": round(runs["sequential"] / runs["parallel"], 2),
            "targets": {
                "int8_size_ratio_le_0.30": int8["size_ratio"],
                "int8_delta_bleu4_within_0.02": int8["delta_bleu4"],
                "qat_int8_size_ratio_le_0.30": qat["size_ratio"],
                "qat_int8_delta_bleu4_within_0.02": qat["delta_bleu4"],
                "shrink_faster_than_int8": [shrink["e2e_ms"], int8["e2e_ms"]],
                "shrink_delta_bleu4_within_0.03": shrink["delta_bleu4"],
                "shrink25_faster_than_int8": [shrink25["e2e_ms"], int8["e2e_ms"]],
                "shrink25_delta_bleu4_within_0.03": shrink25["delta_bleu4"],
            },
            "delta_bleu4_by_seed": spread,
            "fp32_bleu4": fp32["bleu4"],
        },
    )
