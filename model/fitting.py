"""Fitting the captioner by teacher forcing: the caption token sets, the loss, the fit loop, and
TensorFlow's thread count. Training, pretraining and every compression fine-tuning go through
`fit_captions`, so they all optimize the same loss.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence

import numpy as np

from capfleet.model.captioner import Captioner
from capfleet.model.data import ImageRecord
from capfleet.model.text import Vocabulary, clean_caption


def configure_threads(threads: int) -> None:
    """Limit TensorFlow to `threads` cores (0 = all); must run before TensorFlow does work."""
    import tensorflow as tf

    n = threads or os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(min(n, 2))
    except RuntimeError:
        pass  # TensorFlow already started in this process: its thread pools are fixed


def caption_sets(records: Sequence[ImageRecord], vocab: Vocabulary, max_len: int, k: int):
    """(N, k, max_len) token ids: k captions per image, cycling an image's captions when it
    has fewer than k and keeping the first k when it has more."""
    out = np.zeros((len(records), k, max_len), np.int32)
    for i, r in enumerate(records):
        caps = [clean_caption(r.captions[j % len(r.captions)]) for j in range(k)]
        out[i] = vocab.encode_batch(caps, max_len)
    return out


def time_budget(seconds: float):
    """A Keras callback that stops training after the epoch in which `seconds` run out."""
    import tf_keras as keras

    class TimeBudget(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if seconds and time.perf_counter() - self.start > seconds:
                self.model.stop_training = True

    return TimeBudget()


def fit_captions(
    model,
    train_data,
    dev_data,
    epochs,
    batch_size,
    learning_rate,
    seed,
    callbacks,
    *,
    label_smoothing: float,
):
    """Teacher forcing: (inputs, tokens (N, K, T)) -> fit `model` (a training graph) to predict
    each real next token. Returns the Keras History; besides the loss it holds `nll` and `val_nll`,
    the plain cross-entropy, which stays comparable across label smoothings.

    Fine-tuning passes the label smoothing the model was trained with: the same loss."""
    import tf_keras as keras

    (x, tokens), (x_dev, dev_tokens) = train_data, dev_data
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=caption_loss(label_smoothing),
        metrics=[
            keras.metrics.SparseCategoricalCrossentropy(
                name="nll", from_logits=True, ignore_class=0
            )
        ],
    )
    return model.fit(
        caption_batches(x, tokens, batch_size, seed),
        epochs=epochs,
        validation_data=caption_batches(x_dev, dev_tokens, 64),
        callbacks=callbacks,
        verbose=2,
    )


BUCKET_POOL = 32  # batches' worth of images sorted by caption length together


def caption_batches(x, tokens, batch_size: int, seed: int | None = None):
    """Teacher-forcing batches ((x, tokens), next tokens (M,)) as a tf.data Dataset, each batch's
    captions cut to its longest and the next tokens those of `Captioner.next_tokens`, the ones
    the training graph computes logits for. The positions past the longest caption are
    padding, so the cut changes no batch's loss; it saves their LSTM steps (Flickr8k's
    captions average about 11 words, the longest 35: most of a frame sized for the longest is
    padding). The padding left inside a batch gets no softmax: the graph drops it. With a seed
    (training), every epoch shuffles the images, sorts each pool of BUCKET_POOL batches' worth
    by longest caption so that a batch holds captions of like length, and shuffles the
    batches' order; with none (validation) the order is kept. (The loss averages over each
    batch's own tokens, as before; a batch of short captions now has fewer of them.)"""
    import tensorflow as tf

    x, tokens = np.asarray(x), np.asarray(tokens)
    lengths = np.maximum((tokens != 0).sum(axis=-1).max(axis=-1), 2)  # per image, in tokens
    epochs = itertools.count()

    def batches():
        idx = np.arange(len(tokens))
        if seed is None:
            groups = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        else:
            rng = np.random.default_rng([seed, next(epochs)])
            idx, pool, groups = rng.permutation(idx), batch_size * BUCKET_POOL, []
            for start in range(0, len(idx), pool):
                chunk = idx[start : start + pool]
                chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
                groups += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
            groups = [groups[i] for i in rng.permutation(len(groups))]
        for b in groups:
            cut = tokens[b, :, : int(lengths[b].max())]
            yield (x[b], cut), Captioner.next_tokens(cut)

    k = tokens.shape[1]
    spec = (
        (
            tf.TensorSpec((None, *x.shape[1:]), tf.as_dtype(x.dtype)),
            tf.TensorSpec((None, k, None), tf.as_dtype(tokens.dtype)),
        ),
        tf.TensorSpec((None,), tf.as_dtype(tokens.dtype)),
    )
    return tf.data.Dataset.from_generator(batches, output_signature=spec).prefetch(2)


def caption_loss(label_smoothing: float):
    """Cross-entropy of the next token, padding (id 0) ignored; with label smoothing e the target
    is (1 - e) on the true token plus e spread evenly over the vocabulary."""
    import tensorflow as tf
    import tf_keras as keras

    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)

    def smoothed_cross_entropy(tokens, logits):
        # the logits' shape less the vocabulary: Keras hands rank-1 targets in as (M, 1)
        tokens = tf.reshape(tf.cast(tokens, tf.int32), tf.shape(logits)[:-1])
        vocab = tf.shape(logits)[-1]
        target = (1.0 - label_smoothing) * tf.one_hot(tokens, vocab) + label_smoothing / tf.cast(
            vocab, logits.dtype
        )
        per_token = -tf.reduce_sum(target * tf.nn.log_softmax(logits), axis=-1)
        real = tf.cast(tokens != 0, logits.dtype)
        return tf.reduce_sum(per_token * real) / tf.maximum(tf.reduce_sum(real), 1.0)

    return smoothed_cross_entropy
