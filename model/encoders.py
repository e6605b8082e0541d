"""Image encoders: a registry of backbones (tf_keras.applications) and the small CNN.

Every encoder maps preprocessed images (B, S, S, 3) to a feature vector (B, feature_dim).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from model.errors import CapfleetError


@dataclass(frozen=True)
class EncoderInfo:
    """What the rest of capfleet needs to know about an encoder."""

    name: str
    input_size: int  # square input side in pixels
    feature_dim: int
    preprocess: str  # a style of model.images.preprocess
    trainable: bool  # trained jointly with the decoder (else frozen, features cached)
    imagenet: bool  # has ImageNet weights in tf_keras.applications


ENCODERS = {
    "vgg16": EncoderInfo("vgg16", 224, 4096, "caffe", False, True),  # fc2, as the study
    "resnet50": EncoderInfo("resnet50", 224, 2048, "caffe", False, True),  # global average pool
    "mobilenet_v2": EncoderInfo("mobilenet_v2", 224, 1280, "tf", False, True),  # global avg pool
    "small_cnn": EncoderInfo("small_cnn", 64, 256, "unit", True, False),  # for the shapes data
}


def encoder_info(name: str) -> EncoderInfo:
    """The registry entry for `name`; an unknown name is an error listing the allowed ones."""
    try:
        return ENCODERS[name]
    except KeyError:
        raise CapfleetError(
            f"unknown encoder {name!r}; allowed: {', '.join(sorted(ENCODERS))}"
        ) from None


def check_weights(name: str, weights: str | None) -> None:
    """Refuse unusable weights before any work: `imagenet`, a local file, or None (random)."""
    info = encoder_info(name)
    if weights is None:
        return
    if weights == "imagenet":
        if not info.imagenet:
            raise CapfleetError(
                f"encoder {name!r} has no ImageNet weights; use a weights file or none"
            )
        return
    if not Path(weights).is_file():
        raise CapfleetError(
            f"encoder weights {weights!r}: not 'imagenet', 'none' or an existing weights file"
        )


def build_encoder(name: str, weights: str | None = None):
    """A tf_keras Model: preprocessed images (B, S, S, 3) -> features (B, feature_dim).

    Args:
        name: a key of ENCODERS.
        weights: "imagenet" (downloads on first use), a local weights file, or None (random).
    """
    import tf_keras as keras

    info = encoder_info(name)
    check_weights(name, weights)
    shape = (info.input_size, info.input_size, 3)
    try:
        if name == "vgg16":
            full = keras.applications.VGG16(weights=weights, include_top=True, input_shape=shape)
            return keras.Model(full.input, full.get_layer("fc2").output, name="vgg16_fc2")
        if name == "resnet50":
            return keras.applications.ResNet50(
                weights=weights, include_top=False, pooling="avg", input_shape=shape
            )
        if name == "mobilenet_v2":
            return keras.applications.MobileNetV2(
                weights=weights, include_top=False, pooling="avg", input_shape=shape
            )
        model = _small_cnn(keras, shape, info.feature_dim)
        if weights is not None:
            model.load_weights(weights)
        return model
    except (ValueError, OSError) as e:
        raise CapfleetError(f"encoder {name!r}: cannot use weights {weights!r} ({e})") from e


def _small_cnn(keras, shape: tuple[int, int, int], feature_dim: int):
    """Conv blocks that see where they are (CoordConv: x, y channels appended), then a global
    max pool. The convolutions are shared over positions, so a shape learnt in one place is
    known everywhere; the coordinates let a filter also say *where* ("red circle, left")."""
    layers = keras.layers
    add_coords = coords_layer()
    x = inp = keras.Input(shape, name="image")
    x = add_coords(name="coords_in")(x)
    for i, filters in enumerate((32, 64, 96)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        # BatchNorm trains several times faster; momentum 0.9 so that its inference
        # statistics keep up within a short run
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
        x = layers.ReLU(name=f"relu{i + 1}")(x)
        x = layers.MaxPooling2D(name=f"pool{i + 1}")(x)  # 64 -> 32 -> 16 -> 8
    x = add_coords(name="coords_out")(x)
    x = layers.Conv2D(192, 1, activation="relu", name="where_what")(x)  # (B, 8, 8, 192)
    x = layers.GlobalMaxPooling2D(name="max_pool")(x)  # (B, 192)
    return keras.Model(inp, layers.Dense(feature_dim, activation="relu", name="features")(x),
                       name="small_cnn")


@functools.cache
def coords_layer():
    import tensorflow as tf
    import tf_keras as keras

    class AddCoords(keras.layers.Layer):
        """Appends two channels holding each pixel's x and y in [-1, 1]."""

        def call(self, x):  # (B, H, W, C) -> (B, H, W, C + 2)
            shape = tf.shape(x)
            ys = tf.linspace(-1.0, 1.0, shape[1])
            xs = tf.linspace(-1.0, 1.0, shape[2])
            grid = tf.stack(tf.meshgrid(xs, ys), axis=-1)  # (H, W, 2)
            grid = tf.tile(grid[None], [shape[0], 1, 1, 1])
            return tf.concat([x, tf.cast(grid, x.dtype)], axis=-1)

        def compute_output_shape(self, input_shape):
            return (*input_shape[:-1], input_shape[-1] + 2)

    return AddCoords
