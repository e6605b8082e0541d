"""Encoders: Keras fp32 vs LiteRT fp32 for VGG16, ResNet50 and MobileNetV2 (random weights:
size and speed do not depend on their values); images/s at batch 16 with 2 threads, and MB."""

from __future__ import annotations

import gc

import numpy as np

from bench.common import Timer, write_result

BATCH = 16
REPEATS = 3


def run() -> None:
    import tensorflow as tf
    import tf_keras as keras
    from ai_edge_litert.interpreter import Interpreter

    from capfleet.compression.convert import encoder_to_tflite
    from capfleet.model.encoders import build_encoder, encoder_info
    from capfleet.model.fitting import configure_threads

    configure_threads(2)
    rows = []
    for name in ("vgg16", "resnet50", "mobilenet_v2"):
        keras.utils.set_random_seed(0)
        info = encoder_info(name)
        enc = build_encoder(name, None)
        x = np.random.default_rng(0).normal(size=(BATCH, 224, 224, 3)).astype(np.float32)
        enc.predict_on_batch(x)
        with Timer() as t:
            for _ in range(REPEATS):
                ref = enc.predict_on_batch(x)
        keras_ips = BATCH * REPEATS / t.seconds
        keras_mb = sum(int(np.prod(w.shape)) * 4 for w in enc.weights) / 1e6
        blob = encoder_to_tflite(enc)
        run_ = Interpreter(model_content=blob, num_threads=2).get_signature_runner()
        out = run_(image=x)["img_proj"]
        with Timer() as t:
            for _ in range(REPEATS):
                run_(image=x)
        lite_ips = BATCH * REPEATS / t.seconds
        rows.append(
            {
                "encoder": name,
                "feature_dim": info.feature_dim,
                "keras_fp32": {
                    "images_per_s": round(keras_ips, 1),
                    "weights_mb": round(keras_mb, 1),
                },
                "litert_fp32": {
                    "images_per_s": round(lite_ips, 1),
                    "mb": round(len(blob) / 1e6, 1),
                },
                "max_abs_diff": float(np.abs(out - ref).max()),
            }
        )
        print(rows[-1], flush=True)
        del enc, blob, run_
        keras.backend.clear_session()
        gc.collect()
    del tf
    write_result("encoders", {"what": __doc__, "batch": BATCH, "threads": 2, "encoders": rows})
