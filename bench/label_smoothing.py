"""Label smoothing and int8: the shapes spec (jobs/examples/train_shapes.toml, 3,000 images,
seed 0 data) trained with label_smoothing 0 (plain cross-entropy) and 0.1 (the default), each
with training seeds 0 and 1; then fp32, dynamic, int8 and qat-int8 trials of all four models in
one compress job (Ray, 1 CPU a trial). Per model: its fp32 test BLEU-4, the range of its decoder
logits on the int8 calibration steps (which sets the int8 step), and each trial's BLEU-4 and
its delta against that model's fp32. CAPFLEET_BENCH_MODEL=DIR stands for the (seed 0, 0.1)
model, trained by that spec on that data."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from bench.common import SHAPES_SPEC, Timer, shapes_model, write_result
from bench.int8_decoder import logit_stats

TRIALS = ("fp32", "dynamic", "int8", "qat-int8")
SMOOTHINGS = (0.0, 0.1)
SEEDS = (0, 1)


def logits_range(model_dir: Path, calibration_images: int) -> dict:
    from capfleet.compression.trial import calibration_samples
    from capfleet.model.modeldir import load_trained

    cap, backbone, _, manifest = load_trained(model_dir)
    data = manifest["train"]["data"]
    _, dec_samples = calibration_samples(cap, backbone, data, calibration_images, lambda _: None)
    return logit_stats(cap.step_model(), dec_samples)


def run() -> None:
    from capfleet.compression.records import read_trials
    from capfleet.compression.settings import TrialSettings
    from capfleet.jobs.compress.compress_config import CompressConfig
    from capfleet.jobs.compress.trials import run_compress_job
    from capfleet.jobs.specs import load_spec
    from capfleet.model.training import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        default_dir, default_manifest = shapes_model(tmp)
        assert default_manifest["train"]["label_smoothing"] == 0.1, "not the default model"
        data = default_manifest["train"]["data"]
        spec = dataclasses.replace(load_spec(SHAPES_SPEC), data=data)
        models = {}
        for seed in SEEDS:
            for smoothing in SMOOTHINGS:
                name = f"ls{smoothing}-seed{seed}"
                if (seed, smoothing) == (0, 0.1):
                    models[name] = (default_dir, default_manifest, None)
                    continue
                cfg = dataclasses.replace(
                    spec, out=str(tmp / name), seed=seed, label_smoothing=smoothing
                )
                with Timer() as t:
                    manifest = train(cfg, log=lambda _: None)
                models[name] = (Path(cfg.out), manifest, round(t.seconds, 1))
                print(name, manifest["test_metrics"]["bleu4"], flush=True)
        job = CompressConfig(
            models=tuple(str(d) for d, _, _ in models.values()), out=str(tmp / "c"), trials=TRIALS
        )
        run_compress_job(job)
        by_model = {}
        for r in read_trials(job.out):
            by_model.setdefault(r["model"], {})[r["trial"]] = r
        settings = TrialSettings()
        rows = []
        for name, (model_dir, manifest, seconds) in models.items():
            trials = by_model[model_dir.name]
            rows.append(
                {
                    "model": name,
                    "label_smoothing": manifest["train"]["label_smoothing"],
                    "seed": manifest["train"]["seed"],
                    "epochs_run": manifest["epochs_run"],
                    "train_seconds": seconds,
                    "keras_test_bleu4": round(manifest["test_metrics"]["bleu4"], 4),
                    "calibration_logits": logits_range(model_dir, settings.calibration_images),
                    "trials": {
                        t: {
                            "bleu4": round(r["bleu4"], 4),
                            "delta_bleu4": round(r["delta_bleu4"], 4),
                            "size_ratio": round(r["size_ratio"], 3),
                            "e2e_ms": round(r["e2e_ms"], 3),
                        }
                        if r["status"] == "ok"
                        else {"error": r["error"]}
                        for t, r in trials.items()
                    },
                }
            )
            print(rows[-1], flush=True)
    write_result("label_smoothing", {"what": __doc__, "models": rows})
