"""Layer sensitivity and mixed precision with the LiteRT quantizer, on real flatbuffers: a
layer made fragile on purpose ranks first and is the one kept float."""

import numpy as np

from capfleet.compression.mixed import PartQuantizer, precisions, run


def _fragile_model():
    """Dense -> Dense "fragile" -> Dense. The fragile layer's every output channel has one huge
    weight, on an input that is always zero: int8 per channel scales by that weight, so the
    weights that matter round to zero."""
    import tensorflow as tf
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    x = keras.Input((8,), name="x")
    a = keras.layers.Dense(16, activation="relu", name="plain_a")(x)
    b = keras.layers.Dense(16, name="fragile")(a)
    out = keras.layers.Dense(4, name="plain_b")(b)
    model = keras.Model(x, out, name="m")
    w, bias = model.get_layer("plain_a").get_weights()
    w[:, 0], bias[0] = 0.0, 0.0  # plain_a's first unit is always 0
    model.get_layer("plain_a").set_weights([w, bias])
    w, bias = model.get_layer("fragile").get_weights()
    w[0, :] = 1000.0  # ... and it is where fragile's huge weights sit
    model.get_layer("fragile").set_weights([w, bias])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    return converter.convert()


def test_the_fragile_layer_ranks_first_and_is_the_one_kept_float():
    flat = _fragile_model()
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 8)).astype(np.float32)} for _ in range(64)]
    part = PartQuantizer(flat, samples)
    ranked = part.sensitivity()
    assert ranked[0]["layer"] == "fragile", [(r["layer"], r["snr_db"]) for r in ranked]
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    assert ranked[0]["snr_db"] < ranked[1]["snr_db"] - 10  # far worse than the next

    full = part.error(part.quantize_int8())
    mixed, kept = part.mixed_int8(1, ranked)
    assert [k["layer"] for k in kept] == ["fragile"]
    assert part.error(mixed)["snr_db"] > full["snr_db"] + 10  # keeping it float repairs it
    layers = [p for p in precisions(mixed) if p["op"] == "FULLY_CONNECTED"]
    assert [p["precision"] for p in layers] == ["int8", "float32", "int8"], layers
    assert [p["precision"] for p in precisions(flat) if p["op"] == "FULLY_CONNECTED"] == [
        "float32"
    ] * 3


def _outlier_model():
    """Dense "wide" -> Dense "reader" -> Dense: one unit of wide is always about 1000 and
    reader ignores it, so float is unharmed; an int8 tensor between them steps by about 4 and
    rounds the other units (all below 5) away. Int16 steps by 1/32 of a unit. (The last layer
    is not kept: an int16x8 op whose output is the graph's would hand out int16.)"""
    import tensorflow as tf
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    x = keras.Input((8,), name="x")
    a = keras.layers.Dense(256, activation="relu", name="wide")(x)
    b = keras.layers.Dense(256, name="reader")(a)
    out = keras.layers.Dense(4, name="plain")(b)
    model = keras.Model(x, out, name="m")
    w, bias = model.get_layer("wide").get_weights()
    w[:, 0], bias[0] = 0.0, 1000.0
    model.get_layer("wide").set_weights([w, bias])
    w, bias = model.get_layer("reader").get_weights()
    w[0, :] = 0.0
    model.get_layer("reader").set_weights([w, bias])
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def test_ops_hurt_by_their_activations_range_are_repaired_in_int16x8_and_stay_smaller():
    flat = _outlier_model()
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 8)).astype(np.float32)} for _ in range(64)]
    part = PartQuantizer(flat, samples)
    ranked = part.sensitivity()
    full = part.error(part.quantize_int8())["snr_db"]
    as_float, kept_float = part.mixed_int8(2, ranked)
    as_int16, kept_int16 = part.mixed_int8(2, ranked, "int16x8")
    assert {k["layer"] for k in kept_int16} == {"wide", "reader"}  # both sides of the tensor
    assert part.error(as_int16)["snr_db"] > full + 20  # repaired...
    assert len(as_int16) < 0.5 * len(as_float)  # ...with int8 weights, where float keeps float32
    shipped = {p["node"]: p["precision"] for p in precisions(as_int16)}
    assert {shipped[k["node"]] for k in kept_int16} == {"int16x8"}
    assert run(as_int16, {"x": samples[0]["x"]}, raw=True)[0].dtype == np.float32  # float out
