"""Image encoders: a registry of backbones (tf_keras.applications) and the small CNN.

Every encoder maps preprocessed images (B, S, S, 3) to a feature vector (B, feature_dim).
"""

from __future__ import annotations

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
    except Exception as e:  # noqa: BLE001  Keras raises a bare Exception when a download fails
        hint = (
            " (ImageNet weights download on first use: is there network?)"
            if (weights == "imagenet")
            else ""
        )
        raise CapfleetError(f"encoder {name!r}: cannot use weights {weights!r}{hint}: {e}") from e


def _small_cnn(keras, shape: tuple[int, int, int], feature_dim: int):
    """Three conv blocks to an 8x8 map, flattened so that where things are survives."""
    layers = keras.layers
    x = inp = keras.Input(shape, name="image")
    for i, filters in enumerate((24, 48, 96)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = layers.BatchNormalization(name=f"bn{i + 1}")(x)  # trains several times faster
        x = layers.ReLU(name=f"relu{i + 1}")(x)
        x = layers.MaxPooling2D(name=f"pool{i + 1}")(x)  # 64 -> 32 -> 16 -> 8
    x = layers.Conv2D(32, 1, activation="relu", name="squeeze")(x)  # (B, 8, 8, 32)
    x = layers.Flatten(name="flatten")(x)  # (B, 2048)
    x = layers.Dense(feature_dim, activation="relu", name="features")(x)
    return keras.Model(inp, x, name="small_cnn")
