"""Trained model -> bundle: the manifest information every bundle carries (built here once, for
the fp32 export and for every trial), and the fp32 export itself. Also a frozen backbone ->
the fp32 flatbuffer the feature job runs."""

from __future__ import annotations

import os
from pathlib import Path

from capfleet.compression.convert import QUANTIZER, encoder_to_tflite, step_to_tflite
from capfleet.compression.recipes import TrialRecipe, parse_trial
from capfleet.core.artifacts import write_bytes_atomic
from capfleet.core.storage import place
from capfleet.model.bundle import write_bundle
from capfleet.model.captioner import CaptionerConfig
from capfleet.model.encoders import build_encoder, encoder_section
from capfleet.model.modeldir import load_trained, manifest_sha256

FP32 = parse_trial("fp32")


def bundle_info(
    name: str,
    config: CaptionerConfig,
    model_dir: str | Path | None,
    manifest: dict | None,
    recipe: TrialRecipe = FP32,
    **extra,
) -> dict:
    """What a bundle's manifest says of itself besides its files: its name, the recipe that made
    it, the quantizer, the captioner config, what its encoder is fed, and the trained model it
    came from (by path and identity; none for random weights, as the benchmarks build). `extra`
    adds sections (a trial's sparsity and settings)."""
    quantized = (recipe.encoder.quant, recipe.decoder.quant) != ("fp32", "fp32")
    if model_dir is None:
        source, weights = {"note": "never trained: random weights"}, "none"
    else:
        weights = manifest["encoder"]["weights"]
        source = {
            "path": str(Path(model_dir).resolve()),
            "manifest_sha256": manifest_sha256(model_dir),
            "test_metrics": manifest.get("test_metrics", {}),
        }
    return {
        "name": name,
        "recipe": {
            "encoder": recipe.encoder.name,
            "decoder": recipe.decoder.name,
            "trial": recipe.name,
        },
        "quantizer": QUANTIZER if quantized else "none",
        **extra,
        "config": config.to_dict(),
        "encoder": encoder_section(config.encoder, weights),
        "source_model": source,
    }


def export_bundle(model_dir: str | Path, out_dir: str | Path, name: str | None = None) -> dict:
    """Convert a trained model to an fp32 bundle in `out_dir`; returns the bundle manifest."""
    cap, backbone, vocab, manifest = load_trained(model_dir)
    enc_bytes = encoder_to_tflite(cap.encoder_model(backbone))
    step_bytes = step_to_tflite(cap.step_model(), cap.config.units)
    info = bundle_info(name or Path(out_dir).name, cap.config, model_dir, manifest)
    return write_bundle(out_dir, enc_bytes, step_bytes, vocab, info, os.cpu_count() or 1)


def export_backbone(encoder: str, weights: str | None, seed: int, path: str | Path):
    """A frozen backbone (built as train() builds it: random weights from `seed`) -> its fp32
    LiteRT flatbuffer at `path` (signature image -> features), written whole, on disk or in an
    object store. Kept when already there: `path` is named by the backbone
    (model/features.py backbone_file).

    Converted in this process, whatever its size: the feature job runs this in a Ray worker of
    its own, whose memory ends with it."""
    if not place(path).is_file():
        import tf_keras as keras

        keras.utils.set_random_seed(seed)
        backbone = build_encoder(encoder, weights)
        flat = encoder_to_tflite(backbone, output="features", apart=False)
        write_bytes_atomic(path, flat)
    return place(path)
