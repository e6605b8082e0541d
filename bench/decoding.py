"""Decoding: the study's one-image re-run-the-prefix loop vs batched step-wise greedy decoding,
with Keras and with LiteRT, on a Flickr8k-sized decoder (random weights: speed does not depend
on what the weights learnt; every caption then runs to full length, the worst case)."""

from __future__ import annotations

import numpy as np

from bench.common import Timer, write_result

VOCAB = 7579  # Flickr8k's vocabulary with the study's cleaning, min count 1
MAX_LEN = 34  # the study's longest caption
FEATURES = "vgg16"  # 4096-d fc2 features, as the study
STUDY_IMAGES = 16  # the study's loop is slow: time it on a few images
BATCHES = (64, 256, 512)


def study_loop(prefix_model, feats: np.ndarray, call: str) -> list[list[int]]:
    """The study's loop; call="predict" is how the study wrote it (model.predict per word),
    call="predict_on_batch" the same loop without Keras' per-call set-up."""
    from capfleet.model.decoding import prefix_greedy

    def run(f):
        if call == "predict":
            return lambda p: prefix_model.predict([f[None], p], verbose=0)
        return lambda p: prefix_model.predict_on_batch([f[None], p])

    return [prefix_greedy(run(f), MAX_LEN) for f in feats]


def trimmed(ids: np.ndarray) -> list[list[int]]:
    return [[int(x) for x in row if x != 0] for row in ids]


def run() -> None:
    import tf_keras as keras
    from ai_edge_litert.interpreter import Interpreter

    from capfleet.compression.convert import step_to_tflite
    from capfleet.model.captioner import Captioner, CaptionerConfig
    from capfleet.model.decoding import greedy_decode
    from capfleet.model.evaluation import KerasStep

    keras.utils.set_random_seed(0)
    cap = Captioner(CaptionerConfig(FEATURES, VOCAB, MAX_LEN))
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(max(BATCHES), cap.config.feature_dim)).astype(np.float32)
    img_proj = cap.features_model().predict_on_batch(feats)
    prefix = cap.prefix_model()
    study = {}
    for call, n in (("predict", STUDY_IMAGES // 4), ("predict_on_batch", STUDY_IMAGES)):
        study_loop(prefix, feats[:1], call)  # warm-up
        with Timer() as t:
            ids = study_loop(prefix, feats[:n], call)
        study[call] = {
            "images": n,
            "images_per_s": round(n / t.seconds, 3),
            "ms_per_image": round(1000 * t.seconds / n, 1),
            "ids": ids,
        }
        print(call, {k: v for k, v in study[call].items() if k != "ids"}, flush=True)
    reference = study["predict_on_batch"]["ids"]
    study_ips = study["predict"]["images_per_s"]
    fast_ips = study["predict_on_batch"]["images_per_s"]

    keras_step = KerasStep(cap.step_model())
    step_bytes = step_to_tflite(cap.step_model(), cap.config.units)

    rows = []
    for backend in ("keras", "litert"):
        for b in BATCHES:
            if backend == "keras":
                step = keras_step
            else:
                runner = Interpreter(model_content=step_bytes, num_threads=2).get_signature_runner()

                def step(tok, h, c, img, runner=runner):
                    o = runner(token=tok, h=h, c=c, img_proj=img)
                    return o["logits"], o["h"], o["c"]

            greedy_decode(step, img_proj[:b], MAX_LEN)  # warm-up (and interpreter allocation)
            with Timer() as t:
                ids = greedy_decode(step, img_proj[:b], MAX_LEN)
            same = trimmed(ids[:STUDY_IMAGES]) == reference
            ips = b / t.seconds
            rows.append(
                {
                    "backend": backend,
                    "batch": b,
                    "images_per_s": round(ips, 1),
                    "ms_per_image": round(1000 / ips, 3),
                    "speedup_vs_study": round(ips / study_ips, 1),
                    "speedup_vs_study_loop_predict_on_batch": round(ips / fast_ips, 1),
                    "same_captions_as_study": same,
                }
            )
            print(rows[-1], flush=True)
    write_result(
        "decoding",
        {
            "what": __doc__,
            "decoder": {
                "vocab": VOCAB,
                "max_len": MAX_LEN,
                "units": 256,
                "features": FEATURES,
                "weights": "random",
            },
            "threads": 2,
            "study_loop": {
                "images": STUDY_IMAGES,
                "images_per_s": round(study_ips, 3),
                "ms_per_image": round(1000 / study_ips, 1),
            },
            "batched": rows,
        },
    )
