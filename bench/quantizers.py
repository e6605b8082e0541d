"""The TFLite converter's int8 against the LiteRT quantizer's (litert-quantizer), and mixed
precision, on the small-CNN shapes model of bench/common.py (trained here, or
CAPFLEET_BENCH_MODEL). Per part (encoder, decoder step): the float flatbuffer quantized to full
int8 by each, and mixed-int8 (int8 but the 2 ops layer sensitivity ranks worst, kept float):
the part's outputs against float on the calibration samples (SNR dB), its bytes, and the
seconds it took (the quantizer's: its calibration once, then the quantization; the
converter's: the whole int8 conversion). Then the whole model: fp32:fp32, int8:int8 and
mixed-int8:mixed-int8 trials built and scored as `capfleet compress` does (BLEU-4 on the test
split, bundle size, end-to-end LiteRT ms per image at batch 32 on 1 thread)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import shapes_model, write_result


def _parts(model_dir: Path, settings) -> list[dict]:
    from capfleet.compression.convert import encoder_to_tflite, step_to_tflite
    from capfleet.compression.mixed import PartQuantizer
    from capfleet.compression.trial import calibration_images, decoder_samples, encoder_samples
    from capfleet.model.modeldir import load_trained, model_data

    cap, backbone, _, manifest = load_trained(model_dir)
    data = model_data(model_dir, manifest)
    x = calibration_images(cap, data, settings.calibration_images, lambda _: None)
    enc, step = cap.encoder_model(backbone), cap.step_model()
    units = cap.config.units
    parts = {
        "encoder": (
            lambda mode, samples: encoder_to_tflite(enc, mode, samples),
            encoder_samples(x),
        ),
        "decoder": (
            lambda mode, samples: step_to_tflite(step, units, mode, samples),
            decoder_samples(cap, backbone, x),
        ),
    }
    rows = []
    for part, (convert, samples) in parts.items():
        flat = convert("fp32", None)
        t0 = time.perf_counter()
        converter_int8 = convert("int8", samples)
        converter_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        quantizer = PartQuantizer(flat, samples())
        calibrate_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        quantizer_int8 = quantizer.quantize_int8()
        quantize_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ranked = quantizer.sensitivity()
        sensitivity_s = time.perf_counter() - t0
        mixed, kept = quantizer.mixed_int8(2, ranked)
        for name, q, seconds in (
            ("converter int8", converter_int8, converter_s),
            ("litert-quantizer int8", quantizer_int8, calibrate_s + quantize_s),
            ("litert-quantizer mixed-int8", mixed, calibrate_s + sensitivity_s),
        ):
            rows.append(
                {
                    "part": part,
                    "method": name,
                    **quantizer.error(q),
                    "bytes": len(q),
                    "float_bytes": len(flat),
                    "seconds": round(seconds, 2),
                    "kept_float": [k["node"] for k in kept] if "mixed" in name else [],
                }
            )
            print(rows[-1], flush=True)
    return rows


def run() -> None:
    from capfleet.compression.settings import TrialSettings
    from capfleet.compression.trial import measure_bundle, run_trial

    settings = TrialSettings(threads=2)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, _ = shapes_model(Path(tmp))
        parts = _parts(model_dir, settings)
        trials = []
        for trial in ("fp32:fp32", "int8:int8", "mixed-int8:mixed-int8"):
            rec = run_trial(model_dir, trial, Path(tmp) / trial.replace(":", "__"), settings)
            rec.update(measure_bundle(rec["bundle"], rec["data"], settings))
            trials.append(
                {
                    k: rec[k]
                    for k in ("trial", "bleu4", "cider_d", "size_mb", "e2e_ms", "test_images")
                }
            )
            print(trials[-1], flush=True)
    write_result("quantizers", {"what": __doc__, "parts": parts, "trials": trials})
