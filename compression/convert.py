"""Keras graphs -> TFLite flatbuffers with named signatures, a dynamic batch, and a quantization
mode. Quantization is done by TensorFlow's TFLite converter (recorded in bundle manifests as
`tflite-converter`):

    fp32     no quantization
    dynamic  dynamic-range: int8 weights, float activations
    float16  float16 weights (smaller; no faster on CPU, docs/stack.md)
    int8     full integer: int8 weights and activations, calibrated on `representative` samples
             (dicts keyed by the signature's input names), float inputs and outputs
    qat-int8 a quantization-aware-trained graph, converted to full integer like int8: the trained
             ranges where the graph has them (its Dense layers), calibrated ranges elsewhere
             (the LSTM cell, whose weights would otherwise stay float: 3x the size)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from capfleet.model.errors import CapfleetError

MODES = ("fp32", "dynamic", "float16", "int8", "qat-int8")
QUANTIZER = "tflite-converter"

Representative = Callable[[], Iterable[dict]]


def encoder_to_tflite(encoder, mode: str = "fp32", representative: Representative | None = None):
    """Encoder graph (images -> img_proj) -> TFLite with signature inputs {image}."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, *encoder.input_shape[1:]], tf.float32, name="image")

    @tf.function(input_signature=[spec])
    def serve(image):
        return {"img_proj": encoder(image, training=False)}

    return _convert(serve, encoder, mode, representative)


def step_to_tflite(
    step, units: int, mode: str = "fp32", representative: Representative | None = None
) -> bytes:
    """Decoder step graph -> TFLite, inputs {token, h, c, img_proj}, outputs {logits, h, c}."""
    return _convert(step_function(step, units), step, mode, representative)


def step_function(step, units: int):
    """The step graph as the tf.function that bundles sign: a dynamic batch, named inputs."""
    import tensorflow as tf

    specs = [
        tf.TensorSpec([None], tf.int32, name="token"),
        tf.TensorSpec([None, units], tf.float32, name="h"),
        tf.TensorSpec([None, units], tf.float32, name="c"),
        tf.TensorSpec([None, units], tf.float32, name="img_proj"),
    ]

    @tf.function(input_signature=specs)
    def serve(token, h, c, img_proj):
        logits, h2, c2 = step([token, h, c, img_proj], training=False)
        return {"logits": logits, "h": h2, "c": c2}

    return serve


def _convert(fn, keras_model, mode: str, representative: Representative | None) -> bytes:
    import tensorflow as tf

    if mode not in MODES:
        raise CapfleetError(f"unknown conversion mode {mode!r}; allowed: {', '.join(MODES)}")
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [fn.get_concrete_function()], keras_model
    )
    if mode != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode in ("int8", "qat-int8"):
        if representative is None:
            raise CapfleetError(f"{mode} conversion needs representative samples to calibrate on")
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        return converter.convert()
    except Exception as e:  # noqa: BLE001  the converter raises ConverterError and friends
        raise CapfleetError(f"{keras_model.name}: TFLite conversion ({mode}) failed: {e}") from e
