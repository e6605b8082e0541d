"""Where the int8 decoder loses BLEU, on the small-CNN shapes model (jobs/examples/
train_shapes.toml, 3,000 images, seed 0; CAPFLEET_BENCH_MODEL=DIR reuses one that spec made).

The encoder is int8 throughout (an int8 encoder with an fp32 decoder loses almost nothing); the
decoder step is converted five ways, each calibrated on the same decoder steps as the `int8`
recipe: fp32; full int8 (the `int8` recipe); full int8 with its output layer (the logits) left
in float through the TFLite converter's selective quantization; full int8 with the logits
floored at 0 (relu), which spends the int8 range on the top logits only; and 16x8 (int8
weights, int16 activations). The calibration steps' fp32 logits are summarised: their range
sets the int8 step, and a top-2 margin below one step can flip the argmax. Each bundle is
scored on the test split and timed at batch 32 with one thread.
The QuantizationDebugger's per-op error is recorded for the full int8 step.

This is a diagnosis, not a recipe: none of the alternatives is offered by `capfleet compress`."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

import numpy as np

from bench.common import shapes_model, write_result

LOGITS = "StatefulPartitionedCall:2"  # the step's first output, "logits", in converted graphs


def floored_step(step, units):
    """The step function with relu(logits) as its output: greedy decoding needs only the top
    logits, and a floor at 0 spends the int8 range on them (a diagnosis: the output is no
    longer the logits that beam search reads)."""
    import tensorflow as tf

    from capfleet.compression.convert import step_function

    base = step_function(step, units)

    @tf.function(input_signature=base.input_signature)
    def serve(token, h, c, img_proj):
        out = base(token, h, c, img_proj)
        return {**out, "logits": tf.nn.relu(out["logits"])}

    return serve


def logit_stats(step, samples) -> dict:
    """The fp32 step's logits on the calibration steps: the range int8 must cover, and how
    close the two best tokens come (below one int8 step, the argmax can flip)."""
    from capfleet.model.evaluation import KerasStep

    run = KerasStep(step)
    logits = np.concatenate([run(s["token"], s["h"], s["c"], s["img_proj"])[0] for s in samples()])
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    lo, hi = float(logits.min()), float(logits.max())
    return {
        "steps": len(logits),
        "min": round(lo, 2),
        "max": round(hi, 2),
        "int8_step": round((hi - lo) / 255, 3),
        "int8_step_floored_at_0": round(hi / 255, 3),
        "top2_margin_p5": round(float(np.percentile(margin, 5)), 3),
        "top2_margin_p10": round(float(np.percentile(margin, 10)), 3),
        "top2_margin_median": round(float(np.median(margin)), 3),
    }


def run() -> None:
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from capfleet.compression import trial as T
    from capfleet.compression.convert import (
        _convert,
        encoder_to_tflite,
        step_function,
        step_to_tflite,
    )
    from capfleet.model.bundle import BundleRunner, write_bundle
    from capfleet.model.encoders import encoder_info
    from capfleet.model.evaluation import score_captions
    from capfleet.model.fitting import configure_threads
    from capfleet.model.modeldir import load_trained

    configure_threads(2)
    settings = T.TrialSettings()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, _ = shapes_model(tmp)
        cap, backbone, vocab, manifest = load_trained(model_dir)
        data = manifest["train"]["data"]
        info = encoder_info(cap.config.encoder)
        enc_samples, dec_samples = T.calibration_samples(
            cap, backbone, data, settings.calibration_images, lambda _: None
        )
        encoder, step, units = cap.encoder_model(backbone), cap.step_model(), cap.config.units
        x, test_recs = T._test_inputs(data, info, 0, lambda _: None)

        step_int8 = step_to_tflite(step, units, "int8", dec_samples)
        # the QuantizationDebugger feeds lists in the interpreter's input order
        names = [d["name"] for d in Interpreter(model_content=step_int8).get_input_details()]
        order = [next(k for k in ("token", "img_proj", "h", "c") if f"_{k}:" in n) for n in names]

        def listed():
            for sample in dec_samples():
                yield [sample[k] for k in order]

        def converter(ops):
            conv = tf.lite.TFLiteConverter.from_concrete_functions(
                [step_function(step, units).get_concrete_function()], step
            )
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = dec_samples
            conv.target_spec.supported_ops = [ops]
            return conv

        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter(tf.lite.OpsSet.TFLITE_BUILTINS_INT8), debug_dataset=listed
        )
        debugger.run()
        dump = io.StringIO()
        debugger.layer_statistics_dump(dump)
        dump.seek(0)
        per_op = [
            {
                "op": r["op_name"],
                "tensor": r["tensor_name"],
                # quantization error in units of the tensor's int8 step: 0.29 is rounding alone
                "rmse_in_steps": round(
                    float(r["mean_squared_error"]) ** 0.5 / float(r["scale"]), 3
                ),
            }
            for r in csv.DictReader(dump)
            if r["scale"] and float(r["scale"]) > 0
        ]
        float_logits = tf.lite.experimental.QuantizationDebugger(
            converter=converter(tf.lite.OpsSet.TFLITE_BUILTINS_INT8),
            debug_dataset=listed,
            debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=[LOGITS]),
        ).get_nondebug_quantized_model()
        x16 = tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        decoders = {
            "fp32": step_to_tflite(step, units, "fp32"),
            "int8": step_int8,
            "int8, logits layer in float": float_logits,
            "int8, logits floored at 0": _convert(
                floored_step(step, units), step, "int8", dec_samples
            ),
            "16x8 (int16 activations)": converter(x16).convert(),
        }
        logits = logit_stats(step, dec_samples)
        encoders = {"fp32": encoder_to_tflite(encoder, "fp32")}
        encoders["int8"] = encoder_to_tflite(encoder, "int8", enc_samples)

        rows = []
        for enc_name, dec_name in [("fp32", "fp32"), ("int8", "fp32")] + [
            ("int8", d) for d in decoders if d != "fp32"
        ]:
            out = tmp / f"bundle-{len(rows)}"
            bundle = write_bundle(
                out,
                encoders[enc_name],
                decoders[dec_name],
                vocab,
                {
                    "name": out.name,
                    "recipe": {"encoder": enc_name, "decoder": dec_name},
                    "quantizer": "tflite-converter",
                    "config": cap.config.to_dict(),
                    "encoder": T.encoder_section(info.name, "none"),
                    "source_model": {},
                },
            )
            runner = BundleRunner(out, num_threads=settings.bench_threads)
            ids = np.concatenate([runner.caption_ids(x[i : i + 64]) for i in range(0, len(x), 64)])
            scores = score_captions(test_recs, [vocab.decode(r) for r in ids], data)
            timing = T.measure_latency(runner, x, settings.bench_batch, settings.bench_repeats)
            rows.append(
                {
                    "encoder": enc_name,
                    "decoder": dec_name,
                    "bleu4": round(scores["bleu4"], 4),
                    "content_accuracy": round(scores["content_accuracy"], 4),
                    "size_mb": bundle["size_mb"],
                    "decoder_mb": round(bundle["files"]["decoder_step.tflite"]["bytes"] / 1e6, 4),
                    **{k: round(v, 3) for k, v in timing.items()},
                }
            )
            print(rows[-1], flush=True)
    fp32 = rows[0]
    for r in rows:
        r["size_ratio"] = round(r["size_mb"] / fp32["size_mb"], 3)
        r["delta_bleu4"] = round(r["bleu4"] - fp32["bleu4"], 4)
    write_result(
        "int8_decoder",
        {
            "what": __doc__,
            "model_test_metrics": manifest["test_metrics"],
            "calibration_logits": logits,
            "bundles": rows,
            "int8_step_error_per_op": per_op,
        },
    )
