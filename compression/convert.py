"""Keras graphs -> TFLite flatbuffers with named signatures and a dynamic batch."""

from __future__ import annotations

import model  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)


def encoder_to_tflite(encoder) -> bytes:
    """Encoder graph (images -> img_proj) -> fp32 TFLite with signature inputs {image}."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, *encoder.input_shape[1:]], tf.float32, name="image")

    @tf.function(input_signature=[spec])
    def serve(image):
        return {"img_proj": encoder(image, training=False)}

    return _convert(serve, encoder)


def step_to_tflite(step, units: int) -> bytes:
    """Decoder step graph -> fp32 TFLite, inputs {token, h, c, img_proj}, outputs {logits, h, c}."""
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

    return _convert(serve, step)


def _convert(fn, keras_model) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [fn.get_concrete_function()], keras_model
    )
    return converter.convert()
