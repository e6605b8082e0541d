"""One compression trial: (trained model, encoder recipe, decoder recipe) -> a bundle and one
measured record. No Ray here: cluster/ runs many of these as tasks.

The record is honest by construction: sizes raw and gzip side by side, latency measured on the
bundle itself (LiteRT, fixed batch and threads), BLEU from the bundle's own captions of the test
split. Deltas against the fp32 baseline are added by whoever holds all the records.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from compression.convert import QUANTIZER, encoder_to_tflite, step_to_tflite
from compression.recipes import TrialRecipe, check_for_model, parse_trial
from compression.shrink import shrink_captioner
from compression.tune import prune_finetune, prune_one_shot, qat_finetune, sparsity_of
from model.bundle import DECODER_FILE, ENCODER_FILE, BundleRunner, write_bundle
from model.decoding import greedy_decode
from model.encoders import encoder_info
from model.errors import CapfleetError
from model.features import load_images
from model.images import preprocess
from model.training import (
    KerasStep,
    configure_threads,
    encoder_section,
    finetune_data,
    fit_captions,
    load_trained,
    manifest_sha256,
    pretrain_cells,
    read_split,
    score_captions,
)


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
        for name in (
            "finetune_epochs",
            "shrink_epochs",
            "finetune_batch_size",
            "calibration_images",
            "bench_batch",
            "bench_threads",
            "bench_repeats",
            "threads",
        ):
            if getattr(self, name) < 1:
                raise CapfleetError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.eval_images < 0:
            raise CapfleetError(f"eval_images: must be >= 0, got {self.eval_images}")
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


def calibration_samples(cap, backbone, data: str, images: int, log=print):
    """The int8 representative samples (see `_calibration`) from the first `images` images of
    the training split of `data`: (encoder samples, decoder samples)."""
    info = encoder_info(cap.config.encoder)
    calib, _ = load_images(read_split(data, "train")[:images], info.input_size, log)
    return _calibration(cap, backbone, calib, info.preprocess)


def _calibration(cap, backbone, images: np.ndarray, style: str):
    """Representative samples for int8: preprocessed images for the encoder; for the decoder,
    the (token, h, c, img_proj) each step really sees while greedily captioning those images."""
    x = preprocess(images, style)
    enc = cap.encoder_model(backbone)
    proj = enc.predict_on_batch(x)
    seen = []
    step = KerasStep(cap.step_model())

    def recording(tokens, h, c, img_proj):
        seen.append((tokens.copy(), h.copy(), c.copy(), img_proj.copy()))
        return step(tokens, h, c, img_proj)

    greedy_decode(recording, proj, cap.config.max_len)
    rows = [
        {"token": t[i : i + 1], "h": h[i : i + 1], "c": c[i : i + 1], "img_proj": p[i : i + 1]}
        for t, h, c, p in seen
        for i in range(len(t))
    ]
    rng = np.random.default_rng(0)
    picked = [rows[i] for i in rng.permutation(len(rows))[:2000]]

    def encoder_samples():
        for i in range(len(x)):
            yield {"image": x[i : i + 1]}

    def decoder_samples():
        yield from picked

    return encoder_samples, decoder_samples


def _best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000.0


def measure_latency(runner: BundleRunner, x: np.ndarray, batch: int, repeats: int) -> dict:
    """Encoder, decoder and end-to-end ms per image on one batch of preprocessed images (the
    batch is filled by repeating images when the test split is smaller)."""
    reps = -(-batch // len(x))
    xb = np.concatenate([x] * reps)[:batch]
    runner.caption_ids(xb)  # warm up: interpreters built, caches filled
    proj = runner.encode(xb)
    enc = _best_ms(lambda: runner.encode(xb), repeats)
    dec = _best_ms(lambda: greedy_decode(runner.step, proj, runner.max_len), repeats)
    e2e = _best_ms(lambda: runner.caption_ids(xb), repeats)
    return {
        "encoder_ms": enc / batch,
        "decoder_ms": dec / batch,
        "e2e_ms": e2e / batch,
    }


def run_trial(
    model_dir: str | Path,
    trial: str,
    out_dir: str | Path,
    settings: TrialSettings = TrialSettings(),
    log: Callable[[str], None] = print,
) -> dict:
    """Build one trial's bundle and score it; returns its record (compression.report's
    TRIAL_SCHEMA, less the latency that `measure_bundle` adds). Raises CapfleetError for a trial
    that cannot be built."""
    import tf_keras as keras

    t0, started = time.perf_counter(), time.time()
    recipe: TrialRecipe = parse_trial(trial)
    configure_threads(settings.threads)
    keras.utils.set_random_seed(settings.seed)
    cap, backbone, vocab, manifest = load_trained(model_dir)
    info = encoder_info(cap.config.encoder)
    check_for_model(recipe, info.trainable, info.name)
    enc, dec = recipe.encoder, recipe.decoder
    tune = (settings.finetune_epochs, settings.finetune_batch_size)
    lr, seed = settings.finetune_learning_rate, settings.seed
    data = None
    if enc.needs_tuning and info.trainable or dec.needs_tuning:
        train_data, dev_data, train_cfg, (train_recs, dev_recs) = finetune_data(
            cap, backbone, manifest, vocab, log
        )
        data = (train_data, dev_data)
        smoothing = train_cfg.label_smoothing  # fine-tuned on the loss it was trained on

    if enc.shrink or dec.shrink:
        log(f"{recipe.name}: shrink encoder {enc.shrink:.0%}, decoder {dec.shrink:.0%}")
        cap = shrink_captioner(cap, enc.shrink, dec.shrink)
        if enc.shrink and train_cfg.pretrain_epochs:
            # the CNN was pretrained on per-cell labels and frozen: the shrunk one is tuned
            # the same way, then frozen while the (maybe shrunk) decoder is tuned
            tuned = dataclasses.replace(train_cfg, pretrain_epochs=settings.shrink_epochs)
            x_train, x_dev = train_data[0], dev_data[0]
            pretrain_cells(cap.encoder, x_train, train_recs, x_dev, dev_recs, tuned, log)
            cap.encoder.trainable = False
        fit_captions(
            cap.training_model,
            *data,
            settings.shrink_epochs,
            tune[1],
            settings.shrink_learning_rate,
            seed,
            [],
            label_smoothing=smoothing,
        )
    if enc.prune and not info.trainable:
        log(f"{recipe.name}: one-shot pruning of the frozen {info.name} to {enc.prune:.0%}")
        prune_one_shot(backbone, enc.prune)
    enc_tuned = enc.prune if info.trainable else 0.0
    if enc_tuned or dec.prune:
        log(f"{recipe.name}: pruning (encoder {enc_tuned:.0%}, decoder {dec.prune:.0%})")
        prune_finetune(cap, enc_tuned, dec.prune, *data, *tune, lr, seed, smoothing)
    if dec.quant == "qat-int8":
        log(f"{recipe.name}: quantization-aware training of the decoder's Dense layers")
        qat_finetune(cap, *data, *tune, lr, seed, smoothing)

    encoder_model = cap.encoder_model(backbone)
    step_model = cap.step_model()
    sparsity = {"encoder": sparsity_of(encoder_model), "decoder": sparsity_of(step_model)}
    enc_samples = dec_samples = None
    if {"int8", "qat-int8"} & {enc.quant, dec.quant}:
        enc_samples, dec_samples = calibration_samples(
            cap, backbone, manifest["train"]["data"], settings.calibration_images, log
        )
    log(f"{recipe.name}: converting (encoder {enc.quant}, decoder {dec.quant})")
    enc_bytes = encoder_to_tflite(encoder_model, enc.quant, enc_samples)
    step_bytes = step_to_tflite(step_model, cap.config.units, dec.quant, dec_samples)

    out = Path(out_dir)
    bundle = write_bundle(
        out,
        enc_bytes,
        step_bytes,
        vocab,
        {
            "name": out.name,
            "recipe": {"encoder": enc.name, "decoder": dec.name, "trial": recipe.name},
            "quantizer": QUANTIZER if (enc.quant, dec.quant) != ("fp32", "fp32") else "none",
            "sparsity": {k: round(v, 4) for k, v in sparsity.items()},
            "settings": asdict(settings),
            "config": cap.config.to_dict(),
            "encoder": encoder_section(info.name, manifest["encoder"]["weights"]),
            "source_model": {
                "path": str(Path(model_dir).resolve()),
                "manifest_sha256": manifest_sha256(model_dir),
            },
        },
    )

    # scored on the bundle as shipped: LiteRT, test split
    runner = BundleRunner(out, num_threads=settings.bench_threads)
    x, test_recs = _test_inputs(manifest["train"]["data"], info, settings.eval_images, log)
    ids = np.concatenate([runner.caption_ids(x[i : i + 64]) for i in range(0, len(x), 64)])
    scores = score_captions(test_recs, [vocab.decode(r) for r in ids], manifest["train"]["data"])
    files = bundle["files"]
    mb = 1e6
    return {
        "model": Path(model_dir).name,
        "trial": recipe.name,
        "encoder_recipe": enc.name,
        "decoder_recipe": dec.name,
        "status": "ok",
        "error": None,
        "bundle": str(out),
        "size_mb": bundle["size_mb"],
        "gzip_mb": bundle["gzip_size_mb"],
        "encoder_mb": files[ENCODER_FILE]["bytes"] / mb,
        "encoder_gzip_mb": files[ENCODER_FILE]["gzip_bytes"] / mb,
        "decoder_mb": files[DECODER_FILE]["bytes"] / mb,
        "decoder_gzip_mb": files[DECODER_FILE]["gzip_bytes"] / mb,
        "encoder_sparsity": sparsity["encoder"],
        "decoder_sparsity": sparsity["decoder"],
        "bench_batch": settings.bench_batch,
        "bench_threads": settings.bench_threads,
        "bleu1": scores["bleu1"],
        "bleu2": scores["bleu2"],
        "bleu3": scores["bleu3"],
        "bleu4": scores["bleu4"],
        "content_accuracy": scores.get("content_accuracy"),
        "test_images": scores["images"],
        "data": manifest["train"]["data"],
        "wall_s": time.perf_counter() - t0,
        "started": started,
        "finished": time.time(),
    }


def _test_inputs(data: str, info, limit: int, log):
    """Preprocessed test-split images, the first `limit` of them (0 = all), and their records."""
    records = read_split(data, "test")
    if limit:
        records = records[:limit]
    images, records = load_images(records, info.input_size, log)
    return preprocess(images, info.preprocess), records


def measure_bundle(bundle_dir: str | Path, data: str, settings: TrialSettings) -> dict:
    """Encoder, decoder and end-to-end ms per image of a bundle, on its data set's test images
    at settings.bench_batch with settings.bench_threads interpreter threads. Run it with
    nothing else busy on the machine: trials measured side by side disturb each other."""
    runner = BundleRunner(bundle_dir, num_threads=settings.bench_threads)
    info = encoder_info(runner.manifest["encoder"]["name"])
    x, _ = _test_inputs(data, info, settings.bench_batch, lambda _: None)  # one batch's worth
    return measure_latency(runner, x, settings.bench_batch, settings.bench_repeats)


@dataclass(frozen=True)
class CompressConfig:
    """A compress job: every trial on every model, each a task with `cpus_per_trial` CPUs."""

    models: tuple[str, ...]  # trained model directories
    out: str
    trials: tuple[str, ...] = ("fp32", "dynamic", "int8", "qat-int8")
    cpus_per_trial: float = 1.0
    max_retries: int = 1  # a crashed task (worker died) is retried this many times
    settings: TrialSettings = TrialSettings()

    def __post_init__(self) -> None:
        if not self.models:
            raise CapfleetError("models: give at least one trained model directory")
        if not self.trials:
            raise CapfleetError("trials: give at least one trial")
        names = [Path(m).name for m in self.models]
        if len(set(names)) != len(names):
            raise CapfleetError(f"models: two model directories share a name: {names}")
        for t in self.trials:
            parse_trial(t)  # an unknown recipe is refused here, before any work
        if self.cpus_per_trial <= 0:
            raise CapfleetError(f"cpus_per_trial: must be > 0, got {self.cpus_per_trial}")
        if self.max_retries < 0:
            raise CapfleetError(f"max_retries: must be >= 0, got {self.max_retries}")

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
    from model.artifacts import read_manifest_json
    from model.training import MODEL_FORMAT

    plan = cfg.plan()
    for model_dir in cfg.models:
        manifest = read_manifest_json(
            Path(model_dir) / "manifest.json", MODEL_FORMAT, CapfleetError, "model directory"
        )
        try:
            info = encoder_info(manifest["config"]["encoder"])
        except (KeyError, TypeError) as e:
            raise CapfleetError(f"{model_dir}/manifest.json: malformed config ({e})") from e
        for m, trial in plan:
            if m == model_dir:
                check_for_model(parse_trial(trial), info.trainable, info.name)
    return plan
