"""Evaluating a trained captioner with its Keras graphs: the reference captions that bundles are
checked against, and the scores (BLEU-1..4, CIDEr-D, ROUGE-L, and content accuracy on the
shapes data)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from capfleet.core.storage import place
from capfleet.model.captioner import Captioner
from capfleet.model.data import ImageRecord
from capfleet.model.decoding import decode
from capfleet.model.encoders import encoder_info
from capfleet.model.features import load_images, predict_batches
from capfleet.model.metrics import score_corpus
from capfleet.model.text import Vocabulary, clean_caption

ENCODE_BATCH = 16  # images per Keras encoder call


class KerasStep:
    """The Keras step graph as a decoding step function (numpy in, numpy out)."""

    def __init__(self, step_model):
        import tensorflow as tf

        self._fn = tf.function(lambda t, h, c, i: step_model([t, h, c, i], training=False))

    def __call__(self, tokens, h, c, img_proj):
        logits, h2, c2 = self._fn(tokens, h, c, img_proj)
        return logits.numpy(), h2.numpy(), c2.numpy()


def keras_caption_ids(
    cap: Captioner, backbone, images: np.ndarray, beam_width: int = 1, batch_size: int = 256
) -> np.ndarray:
    """RGB uint8 images -> generated ids with the Keras graphs (the reference for bundles).
    The decoder takes `batch_size` images at a time, the encoder ENCODE_BATCH: a CNN's first
    activations are large (VGG16's are 13 MB an image and layer: 256 at once would hold
    several GB of them)."""
    info = encoder_info(cap.config.encoder)
    enc = cap.encoder_model(backbone)
    project = lambda x: predict_batches(enc, x, ENCODE_BATCH, info.preprocess)  # noqa: E731
    return _decode_batches(cap, project, images, beam_width, batch_size)


def _decode_batches(cap: Captioner, project, inputs, beam_width: int, batch_size: int):
    """Generated ids of `inputs`, `batch_size` at a time: `project` maps a batch of them to
    the image projection the Keras step graph decodes from."""
    step = KerasStep(cap.step_model())
    return np.concatenate(
        [
            decode(step, project(inputs[i : i + batch_size]), cap.config.max_len, beam_width)
            for i in range(0, len(inputs), batch_size)
        ]
    )


def score_captions(
    records: Sequence[ImageRecord], captions: Sequence[str], data_dir: str | None = None
) -> dict:
    """BLEU-1..4, CIDEr-D and ROUGE-L against the records' references, and shapes content
    accuracy where the data set has the shapes sidecar. CIDEr-D's IDF is that of these
    records' references: compare it only across captions of the same records."""
    return score_captions_per_image(records, captions, data_dir)[0]


def score_captions_per_image(
    records: Sequence[ImageRecord], captions: Sequence[str], data_dir: str | None = None
) -> tuple[dict, dict[str, list[float]]]:
    """`score_captions` and each image's scores (metrics.PER_IMAGE_METRICS, in record order)."""
    from capfleet.model import shapes

    refs = [[clean_caption(c) for c in r.captions] for r in records]
    metrics, per_image = score_corpus(refs, list(captions))
    metrics = dict(metrics)
    if data_dir and (place(data_dir) / shapes.SIDECAR).is_file():  # a folder or a prefix
        scenes = shapes.load_objects(data_dir)
        by_id = {r.image_id: c for r, c in zip(records, captions, strict=True)}
        metrics["content_accuracy"] = shapes.content_accuracy(by_id, scenes)
    metrics["images"] = len(records)
    return metrics, per_image


def evaluate(
    cap: Captioner,
    backbone,
    vocab: Vocabulary,
    records,
    data_dir: str,
    beam_width: int = 1,
    log: Callable[[str], None] = print,
) -> dict:
    """Caption the records with the Keras graphs and score them."""
    images, records = load_images(records, encoder_info(cap.config.encoder).input_size, log)
    ids = keras_caption_ids(cap, backbone, images, beam_width)
    return score_captions(records, [vocab.decode(row) for row in ids], data_dir)


def evaluate_features(
    cap: Captioner,
    features: np.ndarray,
    vocab: Vocabulary,
    records,
    data_dir: str,
    beam_width: int = 1,
    batch_size: int = 256,
) -> dict:
    """`evaluate` from a frozen backbone's features of the records (the feature cache's): the
    same captions with no image decoded and no backbone run."""
    project = cap.features_model().predict_on_batch
    ids = _decode_batches(cap, project, features, beam_width, batch_size)
    return score_captions(records, [vocab.decode(row) for row in ids], data_dir)
