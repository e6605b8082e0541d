"""Compression steps that train: magnitude pruning (tfmot) and quantization-aware training of the
decoder's Dense layers (tfmot), both fine-tuned through the caption loss; and one-shot magnitude
pruning for frozen backbones, which have no loss to tune on.

tfmot works on Keras 2 only (tf_keras), and its registries know no LSTMCell or Embedding for
quantization: only Dense layers are annotated (docs/stack.md).
"""

from __future__ import annotations

import numpy as np

from capfleet.model.captioner import Captioner
from capfleet.model.fitting import fit_captions


def _is_decoder_layer(cap: Captioner, layer) -> bool:
    return any(layer is getattr(cap, a) for a in ("img_dense", "embedding", "lstm"))


def prune_finetune(
    cap: Captioner,
    encoder_sparsity: float,
    decoder_sparsity: float,
    train_data,
    dev_data,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    label_smoothing: float,
) -> None:
    """Prune the trainable parts to their target sparsity while fine-tuning, in place.

    The sparsity ramps from 0 to the target over the first 2/3 of the steps (tfmot's polynomial
    schedule), then the masks stay; the masked weights are written into `cap`'s own layers."""
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    sparsity = tfmot.sparsity.keras
    steps = max(1, epochs * -(-len(train_data[1]) // batch_size))
    end = max(1, (2 * steps) // 3)

    def schedule(target):
        return sparsity.PolynomialDecay(0.0, target, 0, end, frequency=max(1, end // 10))

    prunable = (keras.layers.Dense, keras.layers.Conv2D, keras.layers.LSTM, keras.layers.Embedding)
    wrappers = []

    def wrap(layer, target):
        w = sparsity.prune_low_magnitude(layer, pruning_schedule=schedule(target))
        wrappers.append(w)
        return w

    def clone_encoder(layer):
        if isinstance(layer, prunable) and encoder_sparsity:
            return wrap(layer, encoder_sparsity)
        return layer

    def clone_top(layer):
        if isinstance(layer, keras.Model):  # the jointly trained small CNN
            return keras.models.clone_model(layer, clone_function=clone_encoder)
        is_decoder = isinstance(layer, prunable) and (
            layer is cap.merge_dense or layer is cap.out_dense or _is_decoder_layer(cap, layer)
        )
        if is_decoder and decoder_sparsity:
            return wrap(layer, decoder_sparsity)
        return layer  # the same layer object: pruned weights land in `cap` itself

    pruned = keras.models.clone_model(cap.training_model, clone_function=clone_top)
    fit_captions(
        pruned,
        train_data,
        dev_data,
        epochs,
        batch_size,
        learning_rate,
        seed,
        [sparsity.UpdatePruningStep()],
        label_smoothing=label_smoothing,
    )
    for w in wrappers:  # the optimizer's last step may have moved masked weights: mask again
        for weight, mask, _ in w.pruning_vars:
            weight.assign(weight * mask)


def prune_one_shot(model, sparsity: float) -> None:
    """Zero the smallest-magnitude share of every Conv2D/Dense kernel of a frozen backbone, in
    place, per layer: the same criterion as tfmot, without fine-tuning."""
    import tf_keras as keras

    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            w, *rest = layer.get_weights()
            k = int(w.size * sparsity)
            if k:
                threshold = np.partition(np.abs(w).ravel(), k - 1)[k - 1]
                w = np.where(np.abs(w) <= threshold, 0.0, w).astype(w.dtype)
            layer.set_weights([w, *rest])


def qat_finetune(
    cap: Captioner,
    train_data,
    dev_data,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    label_smoothing: float,
) -> None:
    """Quantization-aware training of the decoder's Dense layers (image projection, merge,
    logits), as the study did, with the encoder frozen; afterwards `cap` builds its graphs
    from the QAT model's layers, so that the converter sees the learnt quantization ranges."""
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    q = tfmot.quantization.keras
    dense = {cap.img_dense.name, cap.merge_dense.name, cap.out_dense.name}

    def annotate(layer):
        if isinstance(layer, keras.layers.Dense) and layer.name in dense:
            return q.quantize_annotate_layer(layer)
        return layer

    if cap.trainable_encoder:  # QAT tunes the decoder; the encoder (maybe pruned) stays as is
        cap.encoder.trainable = False
    annotated = keras.models.clone_model(cap.training_model, clone_function=annotate)
    with q.quantize_scope():
        qat = q.quantize_apply(annotated)
    fit_captions(
        qat,
        train_data,
        dev_data,
        epochs,
        batch_size,
        learning_rate,
        seed,
        [],
        label_smoothing=label_smoothing,
    )
    cap.rebind(qat)


def sparsity_of(model) -> float:
    """Share of exact zeros among a model's kernels (weights with 2+ dimensions)."""
    total = zeros = 0
    for w in model.get_weights():
        if w.ndim >= 2:
            total += w.size
            zeros += int(np.count_nonzero(w == 0))
    return zeros / total if total else 0.0
