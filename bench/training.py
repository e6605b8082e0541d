"""Training: the study's one-sample-per-word expansion vs teacher forcing over whole captions,
at two vocabulary sizes: the shapes captions (37 words) and Flickr8k-sized captions (the
rehearsal set's ~8,000 words and Flickr8k's lengths, mean about 11 words, a tail to 35). Same
captions, fixed random 4096-d features standing in for VGG16 fc2, same decoder, same loss
(cross-entropy over next words), measured in one run.

Each is one fit of several epochs timed by a callback: the first epoch (graph tracing) apart,
the best of the others as the epoch time (single short epochs were noisy here). Teacher forcing
is timed twice: over the full frame (every caption padded to the longest, logits at every
position: the first wave's path) and as capfleet trains (model.fitting.caption_batches:
batches of like-length captions, each cut to its longest, and the training graph computing
logits only where the next token is a real one). For the latter, where an epoch's time goes:
graph compilation (the first epoch's extra), the input pipeline alone, the LSTM's forward and
backward alone, the output layers alone (the merge Dense and the vocabulary's Dense, softmax
and loss, forward and backward, on the epoch's real next tokens), and the rest (the merge,
the gather, the image projection, the optimizer). The output layers' work is the same for
every target word in the study's expansion too: it bounds the speed-up at a large
vocabulary."""

from __future__ import annotations

import tempfile
import time

import numpy as np

from bench.common import write_result

IMAGES = 1200  # shapes images generated (960 train); the Flickr8k-sized set has as many train
BATCH = 64  # images per teacher-forcing batch (5 captions each)
# epochs per fit: the first is the warm-up; the study's take minutes at the large vocabulary
EPOCHS = {"study_expansion": 3, "teacher_forcing_full_frame": 5, "teacher_forcing": 5}


def _epoch_timer():
    import tf_keras as keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.t0)

    return EpochTimer()


def shapes_captions() -> list[list[str]]:
    from capfleet.model import shapes
    from capfleet.model.data import Flickr8kReader
    from capfleet.model.text import clean_caption

    with tempfile.TemporaryDirectory() as tmp:
        shapes.generate(tmp, images=IMAGES, seed=0)
        recs = Flickr8kReader(tmp, "train").records()
    return [[clean_caption(c) for c in r.captions] for r in recs]


def flickr8k_captions(n: int) -> tuple[list[list[str]], list[str]]:
    """n images' five captions drawn as the rehearsal set draws them, and the whole set's
    captions (8,091 images), from which the vocabulary is built."""
    from capfleet.model import rehearsal

    words = rehearsal.vocabulary()
    p = rehearsal.word_frequencies(len(words))
    rng = np.random.default_rng(0)
    caps = [
        [
            " ".join(words[j] for j in rng.choice(len(words), k, p=p))
            for k in rehearsal.caption_lengths(rng, 5)
        ]
        for _ in range(rehearsal.FLICKR8K["images"])
    ]
    return caps[:n], [c for cs in caps for c in cs]


def measure(caps: list[list[str]], every: list[str]) -> dict:
    import tensorflow as tf
    import tf_keras as keras

    from capfleet.model.captioner import Captioner, CaptionerConfig
    from capfleet.model.fitting import caption_batches
    from capfleet.model.text import Vocabulary

    keras.utils.set_random_seed(0)
    vocab = Vocabulary.build(every)
    max_len = max(len(c.split()) for c in every) + 2
    cfg = CaptionerConfig("vgg16", len(vocab), max_len)
    feats = np.random.default_rng(0).normal(size=(len(caps), cfg.feature_dim)).astype(np.float32)
    tokens = np.stack([vocab.encode_batch(cs, max_len) for cs in caps])  # (N, 5, T)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)

    # The study: every (image, prefix) -> next word is one sample, prefixes left-padded.
    xi, xp, y = [], [], []
    for i in range(len(caps)):
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
    full = _full_frame_graph(cap)
    full.compile(keras.optimizers.Adam(1e-3), loss=loss)
    product = cap.training_model
    product.compile(keras.optimizers.Adam(1e-3), loss=loss)
    study_batch = len(y) // -(-len(caps) // BATCH)  # as many target words per step as below
    batches = caption_batches(feats, tokens, BATCH, seed=0)
    runs = {
        "study_expansion": lambda n, cb: prefix.fit(
            [feats[xi], xp],
            y,
            batch_size=study_batch,
            epochs=n,
            verbose=0,
            shuffle=True,
            callbacks=[cb],
        ),
        "teacher_forcing_full_frame": lambda n, cb: full.fit(
            [feats, tokens[:, :, :-1]],
            tokens[:, :, 1:],
            batch_size=BATCH,
            epochs=n,
            verbose=0,
            callbacks=[cb],
        ),
        "teacher_forcing": lambda n, cb: product.fit(batches, epochs=n, verbose=0, callbacks=[cb]),
    }
    rows = {}
    for name, fit in runs.items():
        # one fit of several epochs, each timed by a callback: the first traces the graphs,
        # the best of the others is the epoch time (single short epochs were noisy here)
        cb = _epoch_timer()
        h = fit(EPOCHS[name], cb)
        rows[name] = {
            "seconds_per_epoch": round(min(cb.seconds[1:]), 2),
            "epochs_s": [round(s, 2) for s in cb.seconds],
            "first_epoch_s": round(cb.seconds[0], 2),
            "loss": round(float(h.history["loss"][-1]), 4),
        }
        print(name, rows[name], flush=True)
    rows["study_expansion"]["samples"] = len(y)

    # where the product path's epoch goes
    t0 = time.perf_counter()
    epoch_batches = [(tb, yb) for (_, tb), yb in batches]
    input_s = time.perf_counter() - t0
    cut = sum(int(np.prod(tb[:, :, 1:].shape)) for tb, _ in epoch_batches)
    lstm_vars = [*cap.embedding.trainable_variables, *cap.lstm.trainable_variables]
    out_vars = [*cap.merge_dense.trainable_variables, *cap.out_dense.trainable_variables]
    units = cfg.units

    @tf.function(input_signature=[tf.TensorSpec((None, None, None), tf.int32)])
    def lstm_step(tb):
        with tf.GradientTape() as tape:
            flat = tf.reshape(tb[:, :, :-1], (-1, tf.shape(tb)[2] - 1))
            out = tf.reduce_sum(cap.lstm(cap.embedding(flat)))
        return tape.gradient(out, lstm_vars)

    @tf.function(input_signature=[tf.TensorSpec((None,), tf.int32)])
    def output_step(yb):
        h = tf.ones((tf.shape(yb)[0], units))  # as many rows as the batch's real next tokens
        with tf.GradientTape() as tape:
            tape.watch(h)
            out = loss(yb, cap.out_dense(cap.merge_dense(h)))
        return tape.gradient(out, [h, *out_vars])

    def best_of_3(step, args):
        for a in args[:2]:
            step(a)  # trace
        best = float("inf")
        for _ in range(3):  # best of 3, as the epochs above
            t0 = time.perf_counter()
            for a in args:
                step(a)
            best = min(best, time.perf_counter() - t0)
        return best

    lstm_s = best_of_3(lstm_step, [tb for tb, _ in epoch_batches])
    output_s = best_of_3(output_step, [yb for _, yb in epoch_batches])
    epoch = rows["teacher_forcing"]["seconds_per_epoch"]
    rows["teacher_forcing"]["where_the_time_goes_s"] = {
        "graph_compilation (first epoch's extra)": round(
            rows["teacher_forcing"]["first_epoch_s"] - epoch, 2
        ),
        "input_pipeline (alone; overlapped in training)": round(input_s, 2),
        "lstm_forward_backward": round(lstm_s, 2),
        "output_layers_softmax_loss_forward_backward": round(output_s, 2),
        "merge_gather_projection_optimizer (the rest)": round(epoch - lstm_s - output_s, 2),
    }
    rows["teacher_forcing"]["frame_positions_after_cut"] = cut
    rows["teacher_forcing"]["target_positions"] = sum(int(yb.shape[0]) for _, yb in epoch_batches)
    # the bound: the study's epoch over what the output layers alone take per epoch
    rows["teacher_forcing"]["speedup_bound_by_output_layers"] = round(
        rows["study_expansion"]["seconds_per_epoch"] / output_s, 2
    )
    rows["teacher_forcing_full_frame"]["target_positions"] = int(tokens[:, :, 1:].size)
    return {
        "images": len(caps),
        "captions": int(tokens.shape[0] * tokens.shape[1]),
        "target_words": len(y),
        "vocab": len(vocab),
        "max_len": max_len,
        **rows,
        "speedup_full_frame": round(
            rows["study_expansion"]["seconds_per_epoch"]
            / rows["teacher_forcing_full_frame"]["seconds_per_epoch"],
            2,
        ),
        "speedup": round(rows["study_expansion"]["seconds_per_epoch"] / epoch, 2),
    }


def _full_frame_graph(cap):
    """The first wave's teacher forcing, on the captioner's own layers: captions (B, K, T) in,
    logits at every position out (B, K, T, V), padding included (the loss ignores it)."""
    import tensorflow as tf
    import tf_keras as keras

    feats = keras.Input((cap.config.feature_dim,), name="features")
    tokens = keras.Input((None, None), dtype="int32", name="tokens")
    shape = tf.shape(tokens)
    flat = tf.reshape(tokens, (-1, shape[2]))
    seq = cap.lstm(cap.txt_dropout(cap.embedding(flat)))
    img = tf.repeat(cap._project(feats), shape[1], axis=0)[:, None, :]
    logits = cap._head(seq, img)
    out = tf.reshape(logits, (shape[0], shape[1], shape[2], cap.config.vocab_size))
    return keras.Model([feats, tokens], out, name="full_frame")


def run() -> None:
    shapes = shapes_captions()
    flickr, every = flickr8k_captions(len(shapes))
    result = {
        "shapes": measure(shapes, [c for cs in shapes for c in cs]),
        "flickr8k_sized": measure(flickr, every),
    }
    write_result(
        "training",
        {
            "what": __doc__,
            **result,
            "teacher_forcing_speedup": {k: v["speedup"] for k, v in result.items()},
            "target_10x_met": {k: v["speedup"] >= 10 for k, v in result.items()},
        },
    )
