"""One compression trial: (trained model, encoder recipe, decoder recipe) -> a bundle and one
measured record. No Ray here: cluster/ runs many of these as tasks.

The record is honest by construction: sizes raw and gzip side by side, latency measured on the
bundle itself (LiteRT, fixed batch and threads), BLEU, CIDEr-D and ROUGE-L from the bundle's own
captions of the test split (every trial of a run scores the same images, so CIDEr-D's IDF is the
same for all). Deltas against the fp32 baseline are added by whoever holds all the records.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from capfleet.compression.convert import QUANTIZER, encoder_conversion, step_to_tflite
from capfleet.compression.export import bundle_info
from capfleet.compression.mixed import QUANTIZER as MIXED_QUANTIZER
from capfleet.compression.mixed import PartQuantizer, precisions
from capfleet.compression.recipes import MIXED, TrialRecipe, check_for_model, parse_trial
from capfleet.compression.records import write_trial_captions
from capfleet.compression.settings import TrialSettings
from capfleet.compression.shrink import shrink_captioner
from capfleet.compression.tune import prune_finetune, prune_one_shot, qat_finetune, sparsity_of
from capfleet.model.bundle import DECODER_FILE, ENCODER_FILE, MB, BundleRunner, write_bundle
from capfleet.model.captioner import Captioner
from capfleet.model.decoding import decode, greedy_decode
from capfleet.model.encoders import encoder_info
from capfleet.model.evaluation import KerasStep, score_captions_per_image
from capfleet.model.features import load_split, predict_batches
from capfleet.model.fitting import configure_threads, fit_captions
from capfleet.model.images import preprocess
from capfleet.model.modeldir import load_trained, model_data
from capfleet.model.pretrain import pretrain_cells
from capfleet.model.training import FinetuneData, finetune_data

DEFAULT_SETTINGS = TrialSettings()


def calibration_samples(cap, backbone, data: str, images: int, log=print, workers: int = 1):
    """The int8 representative samples (see `_calibration`) from the first `images` images of
    the training split of `data` (decoded on `workers` threads): (encoder samples, decoder
    samples)."""
    x = calibration_images(cap, data, images, log, workers)
    return encoder_samples(x), decoder_samples(cap, backbone, x)


def calibration_images(cap, data: str, images: int, log=print, workers: int = 1) -> np.ndarray:
    """The first `images` images of the training split of `data`, preprocessed for the
    captioner's encoder (decoded on `workers` threads)."""
    info = encoder_info(cap.config.encoder)
    calib, _ = load_split(data, "train", info.input_size, images, log, workers)
    return preprocess(calib, info.preprocess)


def _calibration(cap, backbone, images: np.ndarray, style: str):
    """Representative samples for int8 of these images: (encoder samples, decoder samples)."""
    x = preprocess(images, style)
    return encoder_samples(x), decoder_samples(cap, backbone, x)


def encoder_samples(x: np.ndarray):
    """The encoder's int8 representative samples: these preprocessed images, one a sample."""

    def samples():
        for i in range(len(x)):
            yield {"image": x[i : i + 1]}

    return samples


def decoder_samples(cap, backbone, x: np.ndarray):
    """The decoder's int8 representative samples: the (token, h, c, img_proj) each step really
    sees while greedily captioning these preprocessed images (2,000 of them at most)."""
    enc = cap.encoder_model(backbone)
    # a few images at a time: a large CNN's first activations are large, and memory freed
    # after one big batch stays with the process
    proj = predict_batches(enc, x, 8)
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

    def samples():
        yield from picked

    return samples


def _best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000.0


def measure_latency(runner: BundleRunner, x: np.ndarray, batch: int, repeats: int) -> dict:
    """Encoder, decoder and end-to-end ms per image on one batch of preprocessed images (the
    batch is filled by repeating images when the test split is smaller): after a warm-up, the
    best of `repeats` runs each, a run captioning the batch as `BundleRunner.caption_ids` does
    with its two parts timed apart. (Timing the encoder in runs of its own as well ran a
    VGG16 encoder twice as often, each pass seconds on the one thread timed.)"""
    reps = -(-batch // len(x))
    xb = np.concatenate([x] * reps)[:batch]
    runner.caption_ids(xb)  # warm up: interpreters built, caches filled
    enc = dec = e2e = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        proj = runner.encode(xb)
        t1 = time.perf_counter()
        decode(runner.step, proj, runner.max_len, runner.beam_width)
        t2 = time.perf_counter()
        enc, dec, e2e = min(enc, t1 - t0), min(dec, t2 - t1), min(e2e, t2 - t0)
    return {
        "encoder_ms": enc * 1000.0 / batch,
        "decoder_ms": dec * 1000.0 / batch,
        "e2e_ms": e2e * 1000.0 / batch,
    }


def run_trial(
    model_dir: str | Path,
    trial: str,
    out_dir: str | Path,
    settings: TrialSettings = DEFAULT_SETTINGS,
    log: Callable[[str], None] = print,
    captions_out: str | Path | None = None,
    data: str = "",
) -> dict:
    """Build one trial's bundle and score it; returns its record (compression/records.py's
    TRIAL_SCHEMA, less the latency that `measure_bundle` adds). Raises CapfleetError for a trial
    that cannot be built. The steps: tune (shrink, prune, QAT), convert, write, score. With
    `captions_out`, the scored captions are kept there (TRIAL_CAPTIONS_SCHEMA). `data`: where
    the model's data set is now, when not where it was trained (modeldir.model_data)."""
    import tf_keras as keras

    t0, started = time.perf_counter(), time.time()
    recipe = parse_trial(trial)
    configure_threads(settings.threads)
    keras.utils.set_random_seed(settings.seed)
    cap, backbone, vocab, manifest = load_trained(model_dir)
    info = encoder_info(cap.config.encoder)
    check_for_model(recipe, info.trainable, info.name)
    data = model_data(model_dir, manifest, data)
    manifest = {**manifest, "train": {**manifest["train"], "data": data}}  # tuned on it too

    cap = tune(cap, backbone, manifest, vocab, recipe, settings, log)
    done = convert(cap, backbone, data, recipe, settings, log)
    out = Path(out_dir)
    quantizers = sorted({section["quantizer"] for section in done.layers.values()} - {"none"})
    extra = {
        "quantizer": "+".join(quantizers) or "none",  # which tool quantized which part: layers
        "sparsity": {k: round(v, 4) for k, v in done.sparsity.items()},
        "settings": asdict(settings),
        "layers": done.layers,
    }
    info_ = bundle_info(out.name, cap.config, model_dir, manifest, recipe, **extra)
    if done.quantizers and settings.sensitivity_dev_ops:
        dev_deltas(done, vocab, info_, data, settings, log)  # into done.layers' rows
    bundle = write_bundle(out, done.encoder, done.decoder, vocab, info_, settings.threads)
    scores = score_bundle(out, data, settings, log, captions_out)
    dev = score_bundle(out, data, settings, log, split="dev")  # what a goal decides on
    return {
        **_record(Path(model_dir).name, recipe, out, bundle, done.sparsity, settings, scores),
        "dev_bleu4": dev["bleu4"],
        "dev_cider_d": dev["cider_d"],
        "dev_images": dev["images"],
        "data": data,
        "wall_s": time.perf_counter() - t0,
        "started": started,
        "finished": time.time(),
    }


def tune(cap: Captioner, backbone, manifest, vocab, recipe: TrialRecipe, settings, log):
    """The recipe's training steps, in order: shrink (a new, smaller Captioner, fine-tuned),
    magnitude pruning (fine-tuned; one-shot for a frozen backbone), QAT of the decoder. Returns
    the Captioner to convert. Fine-tuning uses the loss the model was trained with."""
    enc, dec = recipe.encoder, recipe.decoder
    data = None
    if (enc.needs_tuning and cap.trainable_encoder) or dec.needs_tuning:
        data = finetune_data(cap, backbone, manifest, vocab, log)
    if enc.shrink or dec.shrink:
        log(f"{recipe.name}: shrink encoder {enc.shrink:.0%}, decoder {dec.shrink:.0%}")
        cap = _shrink(cap, enc.shrink, dec.shrink, data, settings, log)
    if enc.prune and not cap.trainable_encoder:
        log(
            f"{recipe.name}: one-shot pruning of the frozen {cap.config.encoder} to {enc.prune:.0%}"
        )
        prune_one_shot(backbone, enc.prune)
    encoder_sparsity = enc.prune if cap.trainable_encoder else 0.0  # a frozen one: done above
    tuning = {
        "epochs": settings.finetune_epochs,
        "batch_size": settings.finetune_batch_size,
        "learning_rate": settings.finetune_learning_rate,
        "seed": settings.seed,
        "label_smoothing": data.config.label_smoothing if data else 0.0,
    }
    if encoder_sparsity or dec.prune:
        log(f"{recipe.name}: pruning (encoder {encoder_sparsity:.0%}, decoder {dec.prune:.0%})")
        if encoder_sparsity:  # pruning the CNN tunes it, frozen or not
            cap.encoder.trainable = True
        prune_finetune(cap, encoder_sparsity, dec.prune, data.train, data.dev, **tuning)
    if dec.quant == "qat-int8":
        log(f"{recipe.name}: quantization-aware training of the decoder's Dense layers")
        qat_finetune(cap, data.train, data.dev, **tuning)
    return cap


def _shrink(cap: Captioner, encoder_share, decoder_share, data: FinetuneData, settings, log):
    """A shrunk Captioner, fine-tuned for `shrink_epochs`. A CNN that was pretrained on per-cell
    labels and frozen is re-pretrained the same way and frozen before the decoder is tuned."""
    small = shrink_captioner(cap, encoder_share, decoder_share)
    if encoder_share and data.config.pretrain_epochs:
        small.encoder.trainable = True  # a copy of the frozen CNN: learn its cells again
        tuned = dataclasses.replace(data.config, pretrain_epochs=settings.shrink_epochs)
        x_train, x_dev = data.train[0], data.dev[0]
        pretrain_cells(
            small.encoder, x_train, data.train_records, x_dev, data.dev_records, tuned, log
        )
        small.encoder.trainable = False
    fit_captions(
        small.training_model,
        data.train,
        data.dev,
        settings.shrink_epochs,
        settings.finetune_batch_size,
        settings.shrink_learning_rate,
        settings.seed,
        [],
        label_smoothing=data.config.label_smoothing,
    )
    return small


@dataclasses.dataclass
class Converted:
    """A trial's two flatbuffers as shipped, and what layer sensitivity needs of them."""

    encoder: bytes
    decoder: bytes
    sparsity: dict  # part -> the share of zero weights
    layers: dict  # part -> its quantizer, ops' precisions and, when mixed, its sensitivity
    floats: dict = dataclasses.field(default_factory=dict)  # part -> float flatbuffer
    quantizers: dict = dataclasses.field(default_factory=dict)  # mixed part -> PartQuantizer


def convert(cap: Captioner, backbone, data: str, recipe: TrialRecipe, settings, log) -> Converted:
    """The tuned captioner's encoder and step graphs -> TFLite in the recipe's modes, int8
    calibrated on the training split of `data`. A large encoder converts in a process of its
    own, on one thread: the decoder's calibration and conversion run here meanwhile. A mixed
    part is converted float, then quantized op by op by the LiteRT quantizer; then both parts'
    float flatbuffers are kept (the other converted float too, when the dev split measures
    its ops' effect on the whole model)."""
    enc, dec = recipe.encoder, recipe.decoder
    encoder_model = cap.encoder_model(backbone)
    step_model = cap.step_model()
    sparsity = {"encoder": sparsity_of(encoder_model), "decoder": sparsity_of(step_model)}
    converter = ("int8", "qat-int8")  # calibrated by the TFLite converter
    calibrated = (*converter, *MIXED)
    t0 = time.perf_counter()
    x = None
    if enc.quant in calibrated or dec.quant in calibrated:
        x = calibration_images(cap, data, settings.calibration_images, log, settings.threads)
    log(f"{recipe.name}: converting (encoder {enc.quant}, decoder {dec.quant})")
    enc_mode, dec_mode = (("fp32" if q in MIXED else q) for q in (enc.quant, dec.quant))
    enc_samples = encoder_samples(x) if enc.quant in calibrated else None
    with encoder_conversion(
        encoder_model, enc_mode, enc_samples if enc.quant in converter else None
    ) as encoder_flatbuffer:
        dec_samples = decoder_samples(cap, backbone, x) if dec.quant in calibrated else None
        step_bytes = step_to_tflite(
            step_model, cap.config.units, dec_mode, dec_samples if dec.quant in converter else None
        )
        enc_bytes = encoder_flatbuffer()
    done = Converted(enc_bytes, step_bytes, sparsity, {})
    parts = (("encoder", enc, enc_samples), ("decoder", dec, dec_samples))
    for part, part_recipe, samples in parts:
        flat = getattr(done, part)
        section = {"quantizer": QUANTIZER if part_recipe.quant != "fp32" else "none"}
        if part_recipe.fallback:
            quantizer = done.quantizers[part] = PartQuantizer(flat, samples())
            ranked = quantizer.sensitivity()
            keep = part_recipe.keep_float or settings.mixed_float_ops
            flat, kept = quantizer.mixed_int8(keep, ranked, part_recipe.fallback)
            section = {
                "quantizer": MIXED_QUANTIZER,
                "kept": [k["node"] for k in kept],
                "fallback": part_recipe.fallback,
                "sensitivity": ranked,
                "error": quantizer.error(flat),
            }
            log(
                f"{recipe.name}: {part} int8 but {', '.join(section['kept'])} "
                f"({part_recipe.fallback})"
            )
            setattr(done, part, flat)
        done.layers[part] = {**section, "ops": precisions(flat)}
    if done.quantizers and settings.sensitivity_dev_ops:  # the whole model float, for deltas
        # a part converted fp32 (a mixed part is, before the quantizer) is its float already
        float_encoder = enc_bytes
        if enc_mode != "fp32":
            with encoder_conversion(encoder_model) as converted:
                float_encoder = converted()
        float_step = (
            step_bytes if dec_mode == "fp32" else step_to_tflite(step_model, cap.config.units)
        )
        done.floats = {"encoder": float_encoder, "decoder": float_step}
    log(f"{recipe.name}: calibrated and converted in {time.perf_counter() - t0:.1f} s")
    return done


def dev_deltas(done: Converted, vocab, info: dict, data: str, settings, log) -> None:
    """The whole model's dev BLEU-4 and CIDEr-D, float but for one op int8, against all float,
    for each mixed part's `settings.sensitivity_dev_ops` most sensitive ops: written into their
    sensitivity rows (`dev_bleu4_delta`, `dev_cider_d_delta`), so a ranking by the part's
    output error is checked against what a user ships by. Bundles built in a scratch folder."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="capfleet-deltas-") as tmp:

        def dev_scores(name: str, encoder: bytes, decoder: bytes) -> dict:
            write_bundle(Path(tmp) / name, encoder, decoder, vocab, info)
            return score_bundle(Path(tmp) / name, data, settings, lambda _: None, split="dev")

        base = dev_scores("float", done.floats["encoder"], done.floats["decoder"])
        for part, quantizer in done.quantizers.items():
            rows = done.layers[part]["sensitivity"][: settings.sensitivity_dev_ops]
            for i, row in enumerate(rows):
                flats = dict(done.floats)
                flats[part] = quantizer.quantize_int8(only=row["scope"])
                got = dev_scores(f"{part}-{i}", flats["encoder"], flats["decoder"])
                row["dev_bleu4_delta"] = round(got["bleu4"] - base["bleu4"], 6)
                row["dev_cider_d_delta"] = round(got["cider_d"] - base["cider_d"], 6)
            log(
                f"{part}: dev BLEU-4 with one op int8: "
                + ", ".join(f"{r['node']} {r['dev_bleu4_delta']:+.4f}" for r in rows)
            )


def score_bundle(
    bundle_dir: Path, data: str, settings: TrialSettings, log, captions_out=None, split="test"
) -> dict:
    """BLEU-1..4, CIDEr-D, ROUGE-L (and shapes content accuracy) of the bundle as shipped: its
    own LiteRT captions of the `split` of `data` (the first settings.eval_images; 0 = all).
    With `captions_out`, the captions and their per-image scores are written there. Captioning
    uses every CPU the trial holds (settings.threads); latency is measured apart, alone."""
    runner = BundleRunner(bundle_dir, num_threads=settings.threads)
    info = encoder_info(runner.manifest["encoder"]["name"])
    x, test_recs = _test_inputs(data, info, settings.eval_images, log, settings.threads, split)
    t0 = time.perf_counter()
    ids = np.concatenate([runner.caption_ids(x[i : i + 64]) for i in range(0, len(x), 64)])
    log(
        f"{bundle_dir.name}: {len(x)} {split} images captioned in "
        f"{time.perf_counter() - t0:.1f} s on {settings.threads} thread(s)"
    )
    captions = [runner.vocab.decode(r) for r in ids]
    scores, per_image = score_captions_per_image(test_recs, captions, data)
    if captions_out is not None:
        write_trial_captions(captions_out, test_recs, captions, per_image)
    return scores


def _record(model: str, recipe: TrialRecipe, bundle_dir: Path, bundle, sparsity, settings, scores):
    """A built trial's record: sizes from the bundle's manifest, sparsity, scores."""
    files = bundle["files"]
    return {
        "model": model,
        "trial": recipe.name,
        "encoder_recipe": recipe.encoder.name,
        "decoder_recipe": recipe.decoder.name,
        "status": "ok",
        "error": None,
        "bundle": str(bundle_dir),
        "size_mb": bundle["size_mb"],
        "gzip_mb": bundle["gzip_size_mb"],
        "encoder_mb": files[ENCODER_FILE]["bytes"] / MB,
        "encoder_gzip_mb": files[ENCODER_FILE]["gzip_bytes"] / MB,
        "decoder_mb": files[DECODER_FILE]["bytes"] / MB,
        "decoder_gzip_mb": files[DECODER_FILE]["gzip_bytes"] / MB,
        "encoder_sparsity": sparsity["encoder"],
        "decoder_sparsity": sparsity["decoder"],
        "bench_batch": settings.bench_batch,
        "bench_threads": settings.bench_threads,
        **{k: scores[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider_d", "rouge_l")},
        "content_accuracy": scores.get("content_accuracy"),
        "test_images": scores["images"],
    }


def _test_inputs(data: str, info, limit: int, log, workers: int = 1, split: str = "test"):
    """Preprocessed images of a split (the test split's by default), the first `limit` of them
    (0 = all), decoded on `workers` threads, and their records."""
    images, records = load_split(data, split, info.input_size, limit, log, workers)
    return preprocess(images, info.preprocess), records


def measure_bundle(bundle_dir: str | Path, data: str, settings: TrialSettings) -> dict:
    """Encoder, decoder and end-to-end ms per image of a bundle, on its data set's test images
    at settings.bench_batch with settings.bench_threads interpreter threads. Run it with
    nothing else busy on the machine: trials measured side by side disturb each other."""
    runner = BundleRunner(bundle_dir, num_threads=settings.bench_threads)
    info = encoder_info(runner.manifest["encoder"]["name"])
    x, _ = _test_inputs(data, info, settings.bench_batch, lambda _: None)  # one batch's worth
    return measure_latency(runner, x, settings.bench_batch, settings.bench_repeats)
