"""Does the half-width model need longer, or faster, fine-tuning? `shrink-50+int8` on the
small-CNN shapes model (jobs/examples/train_shapes.toml, 3,000 images, seed 0; CAPFLEET_BENCH_MODEL
=DIR reuses one that spec made) tuned for 3 epochs after shrinking (as long as pruning and QAT
are tuned) and for 8 (`shrink_epochs`' default), at the learning rate pruning and QAT are tuned
with (`finetune_learning_rate`, 5e-4) and at 2e-3 (`shrink_learning_rate`'s default, chosen from
this), against `int8` alone, as Ray tasks (1 CPU each); each bundle timed alone at batch 32
with 1 thread."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import shapes_model, write_result

TUNINGS = ((3, 5e-4), (8, 5e-4), (8, 2e-3))  # (shrink_epochs, shrink_learning_rate)


def run() -> None:
    from capfleet.compression.records import read_trials
    from capfleet.compression.settings import TrialSettings
    from capfleet.jobs.compress.compress_config import CompressConfig
    from capfleet.jobs.compress.trials import run_compress_job

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, _ = shapes_model(tmp)
        for epochs, lr in TUNINGS:
            out = tmp / f"epochs-{epochs}-lr-{lr}"
            first = (epochs, lr) == TUNINGS[0]
            trials = ("int8", "shrink-50+int8") if first else ("shrink-50+int8",)
            job = CompressConfig(
                models=(str(model_dir),),
                out=str(out),
                trials=trials,
                cpus_per_trial=1.0,
                settings=TrialSettings(shrink_epochs=epochs, shrink_learning_rate=lr),
            )
            run_compress_job(job)
            runs[epochs, lr] = {r["trial"]: r for r in read_trials(out)}
    int8 = runs[TUNINGS[0]]["int8:int8"]
    rows = [
        {
            "shrink_epochs": epochs,
            "shrink_learning_rate": lr,
            "trial": trial,
            "bleu4": round(r["bleu4"], 4),
            "delta_bleu4": round(r["delta_bleu4"], 4),
            "content_accuracy": round(r["content_accuracy"], 4),
            "size_mb": r["size_mb"],
            "e2e_ms": round(r["e2e_ms"], 3),
            "wall_s": round(r["wall_s"], 1),
        }
        for (epochs, lr), by in runs.items()
        for trial, r in by.items()
        if trial != "fp32:fp32" or (epochs, lr) == TUNINGS[0]
    ]
    for r in rows:
        print(r)
    write_result(
        "shrink_tuning",
        {
            "what": __doc__,
            "trials": rows,
            "target": "faster end to end than int8 alone, BLEU-4 within 0.03 of fp32",
            "int8_e2e_ms": round(int8["e2e_ms"], 3),
        },
    )
