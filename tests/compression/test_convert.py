"""A large graph is converted in a process of its own: same flatbuffer behaviour, clear errors."""

import numpy as np
import pytest

from capfleet.compression import convert
from capfleet.model.errors import CapfleetError


@pytest.fixture(scope="module")
def encoder():
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(5, name="proj")(x), name="tiny_encoder")


def _run(flatbuffer: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=flatbuffer).get_signature_runner()
    return runner(image=x)["img_proj"]


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_a_graph_converted_apart_runs_as_one_converted_in_process(encoder, mode, monkeypatch):
    x = np.random.default_rng(1).normal(size=(6, 16, 16, 3)).astype(np.float32)

    def samples():
        for i in range(len(x)):
            yield {"image": x[i : i + 1]}

    here = convert.encoder_to_tflite(encoder, mode, samples)
    monkeypatch.setattr(convert, "APART_BYTES", 0)  # every graph apart
    calls = []
    real = convert._convert_apart
    monkeypatch.setattr(convert, "_convert_apart", lambda *a: calls.append(a[2]) or real(*a))
    apart = convert.encoder_to_tflite(encoder, mode, samples)
    assert calls == [mode]
    np.testing.assert_array_equal(_run(apart, x), _run(here, x))
    if mode == "fp32":
        np.testing.assert_allclose(_run(apart, x), encoder.predict_on_batch(x), atol=1e-5)


def test_a_failed_conversion_apart_names_the_graph_and_the_cause(encoder, monkeypatch):
    monkeypatch.setattr(convert, "APART_BYTES", 0)

    def wrong_inputs():  # the calibration samples name an input the graph does not have
        yield {"pixels": np.zeros((1, 16, 16, 3), np.float32)}

    with pytest.raises(CapfleetError, match=r"tiny_encoder: TFLite conversion \(int8\) failed"):
        convert.encoder_to_tflite(encoder, "int8", wrong_inputs)
