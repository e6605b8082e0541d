"""Export a trained model directory to a bundle (fp32 for now; recipes build on this)."""

from __future__ import annotations

from pathlib import Path

from compression.convert import encoder_to_tflite, step_to_tflite
from model.bundle import write_bundle
from model.training import encoder_section, load_trained, manifest_sha256


def export_bundle(model_dir: str | Path, out_dir: str | Path, name: str | None = None) -> dict:
    """Convert a trained model to an fp32 bundle in `out_dir`; returns the bundle manifest."""
    cap, backbone, vocab, manifest = load_trained(model_dir)
    config = cap.config
    enc_bytes = encoder_to_tflite(cap.encoder_model(backbone))
    step_bytes = step_to_tflite(cap.step_model(), config.units)
    return write_bundle(
        out_dir,
        enc_bytes,
        step_bytes,
        vocab,
        {
            "name": name or Path(out_dir).name,
            "recipe": {"encoder": "fp32", "decoder": "fp32"},
            "quantizer": "none",
            "config": config.to_dict(),
            "encoder": encoder_section(config.encoder, manifest["encoder"]["weights"]),
            "source_model": {
                "path": str(Path(model_dir).resolve()),
                "manifest_sha256": manifest_sha256(model_dir),
                "test_metrics": manifest.get("test_metrics", {}),
            },
        },
    )
