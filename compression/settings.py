"""How every trial of a compress run is tuned and measured (TrialSettings), a trial's expected
cost, and the file-system-safe names of its outputs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from capfleet.compression.recipes import parse_trial
from capfleet.core.errors import (
    SEED_RANGE,
    THREADS_RANGE,
    CapfleetError,
    check_at_least,
    check_numbers,
    check_range,
)


@dataclass(frozen=True)
class TrialSettings:
    """How every trial of a run is tuned and measured (the same for all, so they compare)."""

    finetune_epochs: int = 3  # pruning and QAT fine-tuning
    shrink_epochs: int = 8  # a shrunk model, rebuilt from the kept weights, needs more
    finetune_learning_rate: float = 5e-4  # pruning and QAT: small steps from the trained model
    shrink_learning_rate: float = 2e-3  # a shrunk model is half retrained (docs/compress.md)
    finetune_batch_size: int = 16
    calibration_images: int = 64  # int8: real preprocessed training images
    mixed_float_ops: int = 2  # mixed-int8/-int16x8: the part's most sensitive ops kept out
    sensitivity_dev_ops: int = 3  # a mixed part's worst ops whose dev BLEU delta is measured
    bench_batch: int = 32  # latency is measured at this batch size...
    bench_threads: int = 1  # ...with this many interpreter threads
    bench_repeats: int = 3  # best of N timings
    eval_images: int = 0  # test images captioned for BLEU; 0 = the whole test split
    threads: int = 1  # TensorFlow threads for tuning and conversion
    seed: int = 0

    def __post_init__(self) -> None:
        check_numbers(self)
        check_range(
            self,
            {
                "seed": SEED_RANGE,
                "threads": THREADS_RANGE,
                "bench_threads": THREADS_RANGE,
                "finetune_epochs": (1, 100_000),
                "shrink_epochs": (1, 100_000),
                "finetune_batch_size": (1, 65_536),
                "calibration_images": (1, 1_000_000),
                "bench_batch": (1, 65_536),
                "bench_repeats": (1, 1000),
                "eval_images": (0, 100_000_000),
                "mixed_float_ops": (1, 10_000),
                "sensitivity_dev_ops": (0, 10_000),
            },
        )
        tuning = ("finetune_epochs", "shrink_epochs", "finetune_batch_size")
        measuring = ("calibration_images", "bench_batch", "bench_threads", "bench_repeats")
        check_at_least(self, (*tuning, *measuring, "threads"), 1)
        check_at_least(self, ("eval_images",), 0)
        for name in ("finetune_learning_rate", "shrink_learning_rate"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise CapfleetError(f"{name}: must be in (0, 1), got {getattr(self, name)}")


def slug(text: str) -> str:
    """A file-system-safe name: "prune-50+int8:qat-int8" -> "prune-50_int8__qat-int8"."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text.replace(":", "__"))


def tuning_epochs(trial: str, settings: TrialSettings) -> int:
    """Epochs of fine-tuning a trial will run (0 for conversion alone): its expected cost, so
    that a job can start the long trials first instead of leaving one to run on alone."""
    recipe = parse_trial(trial)
    enc, dec = recipe.encoder, recipe.decoder
    epochs = 0
    if enc.shrink or dec.shrink:
        epochs += settings.shrink_epochs * (2 if enc.shrink else 1)  # a CNN may be re-pretrained
    if enc.prune or dec.prune:
        epochs += settings.finetune_epochs
    if dec.quant == "qat-int8":
        epochs += settings.finetune_epochs
    return epochs
