"""What a compress job is: the trials to run on which models (CompressConfig), how each is tuned
and measured (TrialSettings), and the plan checked against the models before any work."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from capfleet.compression.goal import Goal
from capfleet.compression.recipes import check_for_model, parse_trial
from capfleet.model.encoders import encoder_info
from capfleet.model.errors import (
    SEED_RANGE,
    THREADS_RANGE,
    CapfleetError,
    check_at_least,
    check_numbers,
    check_range,
)
from capfleet.model.gallery import DEFAULT_GALLERY_IMAGES, check_gallery_size
from capfleet.model.modeldir import read_model_manifest


@dataclass(frozen=True)
class TrialSettings:
    """How every trial of a run is tuned and measured (the same for all, so they compare)."""

    finetune_epochs: int = 3  # pruning and QAT fine-tuning
    shrink_epochs: int = 8  # a shrunk model, rebuilt from the kept weights, needs more
    finetune_learning_rate: float = 5e-4  # pruning and QAT: small steps from the trained model
    shrink_learning_rate: float = 2e-3  # a shrunk model is half retrained (README: compress)
    finetune_batch_size: int = 16
    calibration_images: int = 64  # int8: real preprocessed training images
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


@dataclass(frozen=True)
class CompressConfig:
    """A compress job: every trial on every model, each a task with `cpus_per_trial` CPUs."""

    models: tuple[str, ...]  # trained model directories
    out: str
    trials: tuple[str, ...] = ("fp32", "dynamic", "int8", "qat-int8")
    cpus_per_trial: float = 1.0
    max_retries: int = 1  # a crashed task (worker died) is retried this many times
    settings: TrialSettings = TrialSettings()
    gallery: int = DEFAULT_GALLERY_IMAGES  # test images in OUT/gallery.html; 0 = no gallery
    # A goal instead of a fixed list of trials: the search chooses the trials (compression/goal)
    goal: Goal | None = None

    def __post_init__(self) -> None:
        check_numbers(self)
        if not self.models:
            raise CapfleetError("models: give at least one trained model directory")
        if self.goal is not None and len(self.models) != 1:
            raise CapfleetError(
                f"goal: a goal search chooses a bundle of one model; got {len(self.models)} "
                "models (run one search per model)"
            )
        if not self.trials:
            raise CapfleetError("trials: give at least one trial")
        names = [Path(m).name for m in self.models]
        nameless = [m for m, n in zip(self.models, names, strict=True) if n in ("", ".", "..")]
        if nameless:  # its bundles and records go in OUT/bundles/<its folder name>/
            raise CapfleetError(
                f"models: {nameless[0]!r} names no model folder; give the model directory itself"
            )
        if len(set(names)) != len(names):
            raise CapfleetError(f"models: two model directories share a name: {names}")
        for t in self.trials:
            parse_trial(t)  # an unknown recipe is refused here, before any work
        if not 0 < self.cpus_per_trial <= 1024:
            raise CapfleetError(f"cpus_per_trial: must be in (0, 1024], got {self.cpus_per_trial}")
        check_range(self, {"max_retries": (0, 100)})
        check_gallery_size(self.gallery)

    def plan(self) -> list[tuple[str, str]]:
        """(model dir, trial name) for every trial, the fp32 baseline first for each model, so
        that every record has something to be compared with."""
        names = [parse_trial(t).name for t in self.trials]
        if "fp32:fp32" not in names:
            names.insert(0, "fp32:fp32")
        names = list(dict.fromkeys(names))
        return [(m, t) for m in self.models for t in names]


def checked_plan(cfg: CompressConfig) -> list[tuple[str, str]]:
    """The plan, with every model directory read and every trial checked against its model's
    encoder, so that an impossible trial is refused before any task starts."""
    plan = cfg.plan()
    for model_dir in cfg.models:
        manifest = read_model_manifest(model_dir)
        try:
            info = encoder_info(manifest["config"]["encoder"])
        except (KeyError, TypeError) as e:
            raise CapfleetError(f"{model_dir}/manifest.json: malformed config ({e})") from e
        for m, trial in plan:
            if m == model_dir:
                check_for_model(parse_trial(trial), info.trainable, info.name)
    return plan
