"""Training: the study's one-sample-per-word expansion vs teacher forcing over whole captions.
Same data (shapes captions, fixed random 4096-d features standing in for VGG16 fc2), same
decoder, same loss (cross-entropy over next words); seconds per epoch, measured in one run."""

from __future__ import annotations

import tempfile

import numpy as np

from bench.common import Timer, write_result

IMAGES = 1200  # training images; 5 captions each


def run() -> None:
    import tf_keras as keras

    from capfleet.model import shapes
    from capfleet.model.captioner import Captioner, CaptionerConfig
    from capfleet.model.data import Flickr8kReader
    from capfleet.model.text import Vocabulary, clean_caption

    keras.utils.set_random_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        shapes.generate(tmp, images=IMAGES, seed=0)
        recs = Flickr8kReader(tmp, "train").records()
    caps = [[clean_caption(c) for c in r.captions] for r in recs]
    vocab = Vocabulary.build(c for cs in caps for c in cs)
    max_len = max(len(c.split()) for cs in caps for c in cs) + 2
    cfg = CaptionerConfig("vgg16", len(vocab), max_len)
    feats = np.random.default_rng(0).normal(size=(len(recs), cfg.feature_dim)).astype(np.float32)
    tokens = np.stack([vocab.encode_batch(cs, max_len) for cs in caps])  # (N, 5, T)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)

    # The study: every (image, prefix) -> next word is one sample, prefixes left-padded.
    xi, xp, y = [], [], []
    for i in range(len(recs)):
        for row in tokens[i]:
            n = int((row != 0).sum())
            for k in range(1, n):
                p = np.zeros(max_len, np.int32)
                p[max_len - k :] = row[:k]
                xi.append(i)
                xp.append(p)
                y.append(row[k])
    xi, xp, y = np.asarray(xi), np.stack(xp), np.asarray(y, np.int32)

    cap = Captioner(cfg)
    prefix = cap.prefix_model()
    prefix.compile(keras.optimizers.Adam(1e-3), loss=loss)
    tf_model = cap.training_model
    tf_model.compile(keras.optimizers.Adam(1e-3), loss=loss)
    study_batch = 64 * 5 * (max_len // 2)  # about as many target words per step as below
    rows = {}
    for name, fit in (
        (
            "study_expansion",
            lambda: prefix.fit(
                [feats[xi], xp], y, batch_size=study_batch, epochs=1, verbose=0, shuffle=True
            ),
        ),
        (
            "teacher_forcing",
            lambda: tf_model.fit(
                [feats, tokens[:, :, :-1]],
                tokens[:, :, 1:],
                batch_size=64,
                epochs=1,
                verbose=0,
                shuffle=True,
            ),
        ),
    ):
        fit()  # warm-up epoch: graph tracing is not training time
        with Timer() as t:
            h = fit()
        rows[name] = {
            "seconds_per_epoch": round(t.seconds, 2),
            "loss": round(float(h.history["loss"][-1]), 4),
        }
        print(name, rows[name], flush=True)
    rows["study_expansion"]["samples"] = len(y)
    rows["teacher_forcing"]["samples"] = int(tokens.shape[0] * tokens.shape[1])
    ratio = (
        rows["study_expansion"]["seconds_per_epoch"] / rows["teacher_forcing"]["seconds_per_epoch"]
    )
    write_result(
        "training",
        {
            "what": __doc__,
            "images": len(recs),
            "captions": int(tokens.shape[0] * tokens.shape[1]),
            "target_words": len(y),
            "vocab": len(vocab),
            "max_len": max_len,
            **rows,
            "teacher_forcing_speedup": round(ratio, 2),
        },
    )
