"""Structured pruning keeps exactly the weights it says it keeps: where the removed units and
channels carry nothing (their outgoing weights zeroed by hand), the shrunk model computes the
same captions' logits as the full one."""

import numpy as np
import pytest

from capfleet.compression.shrink import keep_count, shrink_captioner
from capfleet.model.encoders import encoder_info
from capfleet.model.modeldir import load_trained


@pytest.fixture()
def trained(tiny_model):
    return load_trained(tiny_model)


def _logits(cap, images, tokens):
    proj = cap.encoder_model().predict_on_batch(images)
    u = cap.config.units
    h = c = np.zeros((len(images), u), np.float32)
    logits, _, _ = cap.step_model().predict_on_batch([tokens, h, c, proj])
    return logits


def _silence_decoder_units(cap, removed):
    """Units in `removed` feed nothing: merge rows, recurrent rows and logits rows zeroed."""
    w, b = cap.merge_dense.get_weights()
    w[removed] = 0.0
    cap.merge_dense.set_weights([w, b])
    k, r, bias = cap.lstm.get_weights()
    r[removed] = 0.0
    cap.lstm.set_weights([k, r, bias])
    w, b = cap.out_dense.get_weights()
    w[removed] = 0.0
    cap.out_dense.set_weights([w, b])


def _silence_cnn_channels(cnn, share):
    """Each shrinkable Conv2D's removed channels get tiny filters (so they rank last) and the
    next layer that reads them (Conv2D or the Dense after Flatten) ignores them."""
    import tf_keras as keras

    layers = cnn.layers[1:]
    last_pool = max(i for i, x in enumerate(layers) if isinstance(x, keras.layers.MaxPooling2D))
    for i, layer in enumerate(layers):
        if not isinstance(layer, keras.layers.Conv2D) or i > last_pool:  # the head stays whole
            continue
        consumer = next(
            (
                lyr
                for lyr in layers[i + 1 :]
                if isinstance(lyr, keras.layers.Conv2D | keras.layers.Dense)
            ),
            None,
        )
        if consumer is None:  # the output layer: shrink keeps all its channels
            continue
        w, *rest = layer.get_weights()
        n = w.shape[-1]
        removed = np.arange(keep_count(n, share), n)
        w[..., removed] *= 1e-6
        layer.set_weights([w, *rest])
        cw, *crest = consumer.get_weights()
        if isinstance(consumer, keras.layers.Conv2D):
            cw[:, :, removed, :] = 0.0
        else:  # Dense after Flatten: rows are (y, x, channel)
            cw = cw.reshape(-1, n, cw.shape[-1])
            cw[:, removed, :] = 0.0
            cw = cw.reshape(-1, cw.shape[-1])
        consumer.set_weights([cw, *crest])


def test_decoder_shrink_keeps_the_working_units(trained):
    cap, _, vocab, _ = trained
    u = cap.config.units
    _silence_decoder_units(cap, np.arange(0, u, 2))  # every other unit carries nothing
    small = shrink_captioner(cap, 0.0, 0.5)
    assert small.config.units == u // 2
    rng = np.random.default_rng(0)
    s = encoder_info(cap.config.encoder).input_size
    images = rng.random((4, s, s, 3), dtype=np.float32)
    tokens = rng.integers(4, len(vocab), 4).astype(np.int32)
    np.testing.assert_allclose(
        _logits(small, images, tokens), _logits(cap, images, tokens), atol=1e-4
    )


def test_cnn_shrink_keeps_the_working_channels(trained):
    cap, _, _, _ = trained
    _silence_cnn_channels(cap.encoder, 0.5)
    small = shrink_captioner(cap, 0.5, 0.0)
    assert small.encoder.count_params() < cap.encoder.count_params() * 0.7
    widths = {x.name: x.filters for x in small.encoder.layers if hasattr(x, "filters")}
    full = {x.name: x.filters for x in cap.encoder.layers if hasattr(x, "filters")}
    assert widths["conv3"] == full["conv3"] // 2  # the body is halved...
    assert widths["cells"] == full["cells"]  # ...the per-cell head is not
    rng = np.random.default_rng(1)
    s = encoder_info(cap.config.encoder).input_size
    images = rng.random((4, s, s, 3), dtype=np.float32)
    tokens = np.array([4, 5, 6, 7], np.int32)
    np.testing.assert_allclose(
        _logits(small, images, tokens), _logits(cap, images, tokens), atol=1e-4
    )
