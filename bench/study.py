"""The study's table on VGG16 + LSTM: baseline vs quantized encoder + quantized decoder, size MB
and minutes per 2000 images, beside the study's 578.4 -> 155.39 MB and 5.68 -> 1.63 min.

Random weights (seeded), Flickr8k-sized decoder (vocabulary 7,579, 34 tokens, 256 units): size
and speed do not depend on what the weights learnt, and with random weights every caption runs
to full length, the worst case. Calibration and timing use real photos shipped with
scikit-image. Bundles are timed at batch 32 with 2 interpreter threads (the whole machine);
the study's own pipeline (Keras VGG16 per image, then model.predict per word over the padded
prefix) is timed on a few images. Our fp32 encoder is VGG16 up to fc2 (the study kept the
1000-way classifier head too: about 16 MB more)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import write_result

VOCAB, MAX_LEN = 7579, 34
BATCH, THREADS = 32, 2
STUDY = {
    "baseline": {"size_mb": 578.4, "min_per_2000": 5.68},
    "quantized": {"size_mb": 155.39, "min_per_2000": 1.63},
}
KEEP = Path(tempfile.gettempdir()) / "capfleet-bench" / "vgg16-int8"  # for bench.caption


def photos(n: int) -> np.ndarray:
    import skimage

    from capfleet.model.images import decode_image

    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
    root = Path(skimage.__file__).parent / "data"
    imgs = [decode_image((root / name).read_bytes(), (224, 224)) for name in names]
    return np.stack([imgs[i % len(imgs)] for i in range(n)])


def run() -> None:
    import tf_keras as keras

    from capfleet.compression.convert import encoder_to_tflite, step_to_tflite
    from capfleet.compression.export import bundle_info
    from capfleet.compression.recipes import parse_trial
    from capfleet.compression.trial import _calibration, measure_latency
    from capfleet.model.bundle import BundleRunner, write_bundle
    from capfleet.model.captioner import Captioner, CaptionerConfig
    from capfleet.model.decoding import prefix_greedy
    from capfleet.model.encoders import build_encoder
    from capfleet.model.fitting import configure_threads
    from capfleet.model.images import preprocess
    from capfleet.model.text import Vocabulary

    configure_threads(THREADS)
    keras.utils.set_random_seed(0)
    vocab = Vocabulary.build([" ".join(f"w{i}" for i in range(VOCAB - 4))])
    backbone = build_encoder("vgg16", None)
    cap = Captioner(CaptionerConfig("vgg16", len(vocab), MAX_LEN))
    images = photos(BATCH)
    x = preprocess(images, "caffe")

    # the study's pipeline: Keras encoder per image, then the prefix graph re-run per word
    enc, prefix = cap.encoder_model(backbone), cap.prefix_model()
    feats = backbone.predict(x[:1], verbose=0)  # warm-up
    n_study = 2
    t0 = time.perf_counter()
    for i in range(n_study):
        f = backbone.predict(x[i : i + 1], verbose=0)[0]
        prefix_greedy(lambda p, f=f: prefix.predict([f[None], p], verbose=0), MAX_LEN)
    study_ms = (time.perf_counter() - t0) * 1000 / n_study
    print(f"study pipeline: {study_ms:.0f} ms/image", flush=True)
    del feats

    enc_samples, dec_samples = _calibration(cap, backbone, images[:16], "caffe")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for enc_q, dec_q in (("fp32", "fp32"), ("dynamic", "dynamic"), ("int8", "int8")):
            name = f"vgg16-{enc_q}" if enc_q == dec_q else f"vgg16-{enc_q}-{dec_q}"
            out = KEEP if (enc_q, dec_q) == ("int8", "int8") else Path(tmp) / name
            t0 = time.perf_counter()
            manifest = write_bundle(
                out,
                encoder_to_tflite(enc, enc_q, enc_samples),
                step_to_tflite(cap.step_model(), cap.config.units, dec_q, dec_samples),
                vocab,
                bundle_info(name, cap.config, None, None, parse_trial(f"{enc_q}:{dec_q}")),
            )
            convert_s = time.perf_counter() - t0
            runner = BundleRunner(out, num_threads=THREADS)
            lat = measure_latency(runner, x, BATCH, repeats=2)
            rows.append(
                {
                    "bundle": name,
                    "size_mb": manifest["size_mb"],
                    "gzip_mb": manifest["gzip_size_mb"],
                    **{k: round(v, 2) for k, v in lat.items()},
                    "min_per_2000": round(lat["e2e_ms"] * 2000 / 60000, 3),
                    "convert_s": round(convert_s, 1),
                }
            )
            print(rows[-1], flush=True)
            del runner
    base, quant = rows[0], rows[-1]
    size_cut = 1 - quant["size_mb"] / base["size_mb"]
    time_cut = 1 - quant["e2e_ms"] / base["e2e_ms"]
    study_min = study_ms * 2000 / 60000
    write_result(
        "study",
        {
            "what": __doc__,
            "batch": BATCH,
            "threads": THREADS,
            "study_pipeline": {
                "ms_per_image": round(study_ms, 1),
                "images_timed": n_study,
                "min_per_2000": round(study_min, 2),
            },
            "bundles": rows,
            "study_reported": STUDY,
            "cuts": {
                "int8_vs_fp32_bundle": {"size": round(size_cut, 3), "time": round(time_cut, 3)},
                "int8_bundle_vs_study_pipeline_time": round(
                    1 - quant["min_per_2000"] / study_min, 4
                ),
                "study": {"size": round(1 - 155.39 / 578.4, 3), "time": round(1 - 1.63 / 5.68, 3)},
            },
            "target": "at least the study's 71.3% size cut and 73.1% time cut",
            "int8_bundle_kept_at": str(KEEP),
        },
    )
