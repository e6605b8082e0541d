"""The decoder graphs share one set of weights and compute the same function."""

import numpy as np
import pytest

from capfleet.core.errors import CapfleetError
from capfleet.model.captioner import Captioner, CaptionerConfig
from capfleet.model.decoding import beam_decode, greedy_decode, prefix_greedy
from capfleet.model.encoders import build_encoder, check_weights
from capfleet.model.evaluation import KerasStep
from capfleet.model.text import END_ID, PAD_ID, START_ID

FEATURE_ENCODER = "mobilenet_v2"  # a frozen encoder: the graphs take features, no backbone built


@pytest.fixture(scope="module")
def cap():
    import tf_keras as keras

    keras.utils.set_random_seed(1)
    cfg = CaptionerConfig(FEATURE_ENCODER, vocab_size=23, max_len=8, units=16, embed_dim=12)
    c = Captioner(cfg)
    # spread the output weights so that argmax decisions are far from ties
    w, b = c.out_dense.get_weights()
    c.out_dense.set_weights([w * 8, b])
    return c


def left_pad(seq, n):
    out = np.zeros((n,), np.int32)
    out[n - len(seq) :] = seq
    return out


def test_teacher_forcing_equals_prefix_graph_for_every_prefix(cap):
    rng = np.random.default_rng(0)
    n, t = 4, cap.config.max_len
    feats = rng.normal(size=(n, cap.config.feature_dim)).astype(np.float32)
    lengths = [8, 5, 3, 6]
    tokens = np.zeros((n, t), np.int32)
    for i, length in enumerate(lengths):
        tokens[i, :length] = [START_ID, *rng.integers(4, 23, size=length - 2), END_ID]
    # two captions per image in the training graph: the same caption twice must agree too
    pair = np.stack([tokens, tokens], axis=1)  # (N, 2, T)
    both = cap.training_model.predict_on_batch([feats, pair])  # (M, V): real next tokens only
    np.testing.assert_array_equal(
        cap.next_tokens(pair),
        np.concatenate([np.tile(tokens[i, 1:n], 2) for i, n in enumerate(lengths)]),
    )
    assert both.shape == (2 * sum(n - 1 for n in lengths), cap.config.vocab_size)
    prefix = cap.prefix_model()
    start = 0
    for i, length in enumerate(lengths):  # image i: caption 0's length-1 rows, then caption 1's
        first, second = (
            both[start : start + length - 1],
            both[start + length - 1 : start + 2 * (length - 1)],
        )
        start += 2 * (length - 1)
        np.testing.assert_allclose(first, second, atol=1e-6)
        prefixes = np.stack([left_pad(tokens[i, : k + 1], t) for k in range(length - 1)])
        logits = prefix.predict_on_batch([np.repeat(feats[i : i + 1], length - 1, 0), prefixes])
        np.testing.assert_allclose(logits, first, atol=1e-5)


def test_batched_greedy_equals_the_study_loop(cap):
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(6, cap.config.feature_dim)).astype(np.float32)
    img_proj = cap.features_model().predict_on_batch(feats)
    ids = greedy_decode(KerasStep(cap.step_model()), img_proj, cap.config.max_len)
    assert ids.shape == (6, cap.config.max_len - 1)
    prefix = cap.prefix_model()
    for i in range(6):
        expected = prefix_greedy(
            lambda p, i=i: prefix.predict_on_batch([feats[i : i + 1], p]), cap.config.max_len
        )
        got = [int(x) for x in ids[i] if x != PAD_ID]
        assert got == expected


def test_beam_width_one_is_greedy_and_wider_beams_score_no_worse(cap):
    rng = np.random.default_rng(3)
    img_proj = cap.features_model().predict_on_batch(
        rng.normal(size=(5, cap.config.feature_dim)).astype(np.float32)
    )
    step = KerasStep(cap.step_model())
    greedy = greedy_decode(step, img_proj, cap.config.max_len)
    np.testing.assert_array_equal(beam_decode(step, img_proj, cap.config.max_len, 1), greedy)
    beam = beam_decode(step, img_proj, cap.config.max_len, 4)

    def logprob(ids):
        from capfleet.model.decoding import _log_softmax

        total = np.zeros(len(ids))
        tokens = np.full(len(ids), START_ID, np.int32)
        h = c = np.zeros((len(ids), cap.config.units), np.float32)
        alive = np.ones(len(ids), bool)
        for t in range(ids.shape[1]):
            logits, h, c = step(tokens, h, c, img_proj)
            lp = _log_softmax(logits.astype(np.float64))
            word = ids[:, t]
            alive &= word != PAD_ID
            total += np.where(alive, lp[np.arange(len(ids)), np.maximum(word, 0)], 0.0)
            alive &= word != END_ID
            tokens = np.where(alive, word, PAD_ID).astype(np.int32)
        return total

    assert np.all(logprob(beam) >= logprob(greedy) - 1e-6)


def test_encoder_registry_errors_name_what_is_allowed(tmp_path):
    with pytest.raises(CapfleetError, match="allowed: mobilenet_v2, resnet50, small_cnn, vgg16"):
        build_encoder("inception")
    with pytest.raises(CapfleetError, match="no ImageNet weights"):
        check_weights("small_cnn", "imagenet")
    with pytest.raises(CapfleetError, match="existing weights file"):
        check_weights("vgg16", str(tmp_path / "nope.h5"))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(CapfleetError, match="cannot use weights"):
        build_encoder("small_cnn", str(tmp_path / "junk.h5"))


def test_small_cnn_output_shape():
    enc = build_encoder("small_cnn")
    out = enc.predict_on_batch(np.zeros((2, 72, 72, 3), np.float32))
    assert out.shape == (2, 153)  # 17 attribute scores for each of the 3x3 cells


def test_caption_batches_cut_padding_without_changing_a_loss(cap):
    from capfleet.model.fitting import BUCKET_POOL, caption_batches, caption_loss

    rng = np.random.default_rng(0)
    n, k, t, batch = 200, 3, cap.config.max_len, 8
    lengths = rng.integers(2, t + 1, (n, k))  # start + words + end, in tokens
    tokens = np.zeros((n, k, t), np.int32)
    for i, j in np.ndindex(n, k):
        tokens[i, j, : lengths[i, j]] = rng.integers(3, cap.config.vocab_size, lengths[i, j])
    x = rng.normal(size=(n, cap.config.feature_dim)).astype(np.float32)

    def epoch(ds):
        return [(xb.numpy(), tb.numpy(), yb.numpy()) for (xb, tb), yb in ds]

    def framed(tb):  # a batch's captions padded back to the full frame
        return np.pad(tb, ((0, 0), (0, 0), (0, t - tb.shape[2])))

    ds = caption_batches(x, tokens, batch, seed=3)
    first, second = epoch(ds), epoch(ds)
    for batches in (first, second):  # every image exactly once per epoch, with its own captions
        rows = np.concatenate([xb for xb, _, _ in batches])
        order = [int(np.flatnonzero((x == r).all(axis=1))[0]) for r in rows]
        assert sorted(order) == list(range(n))
        got = np.concatenate([framed(tb) for _, tb, _ in batches])
        np.testing.assert_array_equal(got, tokens[order])
        for _, tb, yb in batches:  # the targets: every real next token, in the graph's order
            np.testing.assert_array_equal(yb, cap.next_tokens(tb))
    assert [b[0].tobytes() for b in first] != [b[0].tobytes() for b in second]  # reshuffled
    assert [b[0].tobytes() for b in first] == [
        b[0].tobytes() for b in epoch(caption_batches(x, tokens, batch, seed=3))
    ]  # one seed, one order
    # each batch ends at its longest caption, and like lengths share a batch: far less
    # padding than batches of random images (whose longest is nearly always the frame)
    for _, tb, _ in first:  # (no token lost: checked above)
        assert (tb[:, :, -1] != 0).any()
    assert BUCKET_POOL * batch >= n  # one pool here: the whole set sorted
    cut = sum(tb[:, :, 1:].size for _, tb, _ in first)
    assert cut < 0.9 * n * k * (t - 1)
    assert sum(yb.size for *_, yb in first) == (tokens[:, :, 1:] != 0).sum()

    # the cut changes no loss: a cut batch scores as the same batch padded to the full frame
    loss = caption_loss(0.1)
    for xb, tb, yb in first[:4]:
        a = float(loss(yb, cap.training_model([xb, tb], training=False)))
        b = float(loss(yb, cap.training_model([xb, framed(tb)], training=False)))
        assert a == pytest.approx(b, rel=1e-5)

    val = epoch(caption_batches(x, tokens, 64))  # no seed: the order kept
    np.testing.assert_array_equal(np.concatenate([xb for xb, _, _ in val]), x)
