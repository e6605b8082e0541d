"""Structured pruning ("shrink"): remove whole units and channels, rebuild a smaller model with
the weights that are kept. Unlike magnitude pruning this makes the model both smaller and faster
on a CPU (docs/stack.md); the caller fine-tunes the result.

Decoder: the image projection, the LSTM and the merge layer share one width U (projection and
LSTM state are added); a unit's importance is the L2 norm of what it feeds the next layer
(merge rows for the shared width, logits rows for the merge layer's outputs).
Small CNN: each Conv2D keeps its output channels with the largest L1 filter norms; the layers
after it (BatchNorm, the next Conv2D, the Dense after Flatten) keep the matching slices. The
feature width stays (a last Conv2D that is the output keeps all its channels), so the decoder
is unchanged by an encoder shrink.
"""

from __future__ import annotations

import numpy as np

from capfleet.core.errors import CapfleetError
from capfleet.model.captioner import Captioner, CaptionerConfig


def keep_count(n: int, share: float) -> int:
    """How many of `n` units survive removing `share` of them (at least one)."""
    return max(1, round(n * (1.0 - share)))


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, in their original order."""
    return np.sort(np.argsort(-scores, kind="stable")[:k])


def shrink_captioner(cap: Captioner, encoder_share: float, decoder_share: float) -> Captioner:
    """A new, smaller Captioner holding the kept weights of `cap`."""
    encoder = cap.encoder
    if encoder_share:
        if not cap.trainable_encoder:
            raise CapfleetError(f"shrink: {cap.config.encoder} is a frozen backbone")
        encoder = shrink_cnn(cap.encoder, encoder_share)
    if not decoder_share:
        if encoder is cap.encoder:
            return cap
        small = Captioner(cap.config, encoder=encoder)
        _copy_decoder(cap, small, None, None)
        return small

    u = cap.config.units
    k = keep_count(u, decoder_share)
    merge_w = cap.merge_dense.get_weights()[0]  # (U, U)
    out_w = cap.out_dense.get_weights()[0]  # (U, V)
    keep_u = _top(np.linalg.norm(merge_w, axis=1), k)  # shared width: what feeds the merge
    keep_m = _top(np.linalg.norm(out_w, axis=1), k)  # merge outputs: what feeds the logits
    c = cap.config
    config = CaptionerConfig(c.encoder, c.vocab_size, c.max_len, k, c.embed_dim, c.dropout)
    small = Captioner(config, encoder=encoder)
    _copy_decoder(cap, small, keep_u, keep_m)
    return small


def _copy_decoder(src: Captioner, dst: Captioner, keep_u, keep_m) -> None:
    if keep_u is None:
        for attr in ("img_dense", "embedding", "lstm", "merge_dense", "out_dense"):
            getattr(dst, attr).set_weights(getattr(src, attr).get_weights())
        return
    u = src.config.units
    w, b = src.img_dense.get_weights()
    dst.img_dense.set_weights([w[:, keep_u], b[keep_u]])
    dst.embedding.set_weights(src.embedding.get_weights())
    kernel, recurrent, bias = src.lstm.get_weights()  # gates i, f, c, o side by side
    cols = np.concatenate([g * u + keep_u for g in range(4)])
    dst.lstm.set_weights([kernel[:, cols], recurrent[np.ix_(keep_u, cols)], bias[cols]])
    w, b = src.merge_dense.get_weights()
    dst.merge_dense.set_weights([w[np.ix_(keep_u, keep_m)], b[keep_m]])
    w, b = src.out_dense.get_weights()
    dst.out_dense.set_weights([w[keep_m], b])


def shrink_cnn(cnn, share: float):
    """A copy of a chain-shaped CNN (Conv2D / BatchNorm / activations / pooling / Flatten /
    Dense) with `share` of its Conv2D channels removed; the final feature width stays.

    The head, the convs after the chain's last pooling layer, keeps its width too: it maps
    each position to the features the decoder reads (the small CNN's per-cell scores), so
    thinning it removes information rather than spare capacity (docs/compress.md)."""
    import tf_keras as keras

    config = cnn.get_config()
    layers = cnn.layers[1:]  # after the input
    supported = (
        keras.layers.Conv2D,
        keras.layers.BatchNormalization,
        keras.layers.ReLU,
        keras.layers.Activation,
        keras.layers.MaxPooling2D,
        keras.layers.AveragePooling2D,
        keras.layers.Dropout,
        keras.layers.Flatten,
        keras.layers.Dense,
        keras.layers.GlobalMaxPooling2D,
        keras.layers.GlobalAveragePooling2D,
    )
    for layer in layers:
        if not isinstance(layer, supported) or len(layer.inbound_nodes) != 1:
            raise CapfleetError(
                f"shrink: {cnn.name} layer {layer.name} ({type(layer).__name__}) is not "
                "supported; shrink handles chains of Conv2D/BatchNorm/pooling/Flatten/Dense"
            )
    convs = [i for i, x in enumerate(layers) if isinstance(x, keras.layers.Conv2D)]
    dense = [i for i, x in enumerate(layers) if isinstance(x, keras.layers.Dense)]
    pools = [
        i
        for i, x in enumerate(layers)
        if isinstance(x, keras.layers.MaxPooling2D | keras.layers.AveragePooling2D)
    ]
    keep: dict[str, np.ndarray] = {}
    for i in convs:
        if i == convs[-1] and max(dense, default=-1) < i:  # sets the feature width: kept whole
            continue
        if pools and i > pools[-1]:  # the head: kept whole
            continue
        w = layers[i].get_weights()[0]  # (kh, kw, in, out)
        keep[layers[i].name] = _top(np.abs(w).sum(axis=(0, 1, 2)), keep_count(w.shape[-1], share))
    for spec in config["layers"]:
        if spec["name"] in keep:
            spec["config"]["filters"] = int(len(keep[spec["name"]]))
    small = keras.Model.from_config(config)

    channels = None  # kept indices of the current tensor's channels
    spatial = None  # (h, w) when the chain has been flattened
    for layer in layers:
        new = small.get_layer(layer.name)
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.Conv2D):
            w = weights[0] if channels is None else weights[0][:, :, channels, :]
            idx = keep.get(layer.name, np.arange(w.shape[-1]))
            new.set_weights([w[..., idx], *[b[idx] for b in weights[1:]]])
            channels = idx
        elif isinstance(layer, keras.layers.BatchNormalization):
            new.set_weights([v[channels] for v in weights] if channels is not None else weights)
        elif isinstance(layer, keras.layers.Flatten):
            h, w_, c = layer.input_shape[1:]
            spatial = (h, w_, c)
        elif isinstance(layer, keras.layers.Dense):
            w, *rest = weights
            if channels is not None:
                if spatial is not None:  # rows are (y, x, channel) flattened
                    h, w_, c = spatial
                    w = w.reshape(h, w_, c, -1)[:, :, channels, :].reshape(-1, w.shape[-1])
                else:  # after global pooling: rows are channels
                    w = w[channels]
            new.set_weights([w, *rest])
            channels, spatial = None, None
    return small
