"""Image encoders: a registry of backbones (tf_keras.applications) and the small CNN.

Every encoder maps preprocessed images (B, S, S, 3) to a feature vector (B, feature_dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from capfleet.core.errors import CapfleetError


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
    "small_cnn": EncoderInfo("small_cnn", 72, 153, "unit", True, False),  # for the shapes data
}


def encoder_info(name: str) -> EncoderInfo:
    """The registry entry for `name`; an unknown name is an error listing the allowed ones."""
    try:
        return ENCODERS[name]
    except KeyError:
        raise CapfleetError(
            f"unknown encoder {name!r}; allowed: {', '.join(sorted(ENCODERS))}"
        ) from None


def encoder_section(name: str, weights: str) -> dict:
    """The `encoder` section of model and bundle manifests: what a runner needs to feed it."""
    info = encoder_info(name)
    return {
        "name": name,
        "weights": weights,
        "input_size": info.input_size,
        "preprocess": info.preprocess,
    }


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


CELL_GRID = 3  # the small CNN describes each cell of the shapes data set's 3x3 layout
# ...with one score per value of each attribute, "none" included: size (3), colour (6), shape
# (5), background (3). model/shapes.py cell_targets() writes labels in this layout.
CELL_SCORES = 17


def _small_cnn(keras, shape: tuple[int, int, int], feature_dim: int):
    """Three conv blocks (72 -> 36 -> 18 -> 9), a max pool to the 3x3 cells of the shapes
    layout, then per cell (shared 1x1 convs) a 16-d code and 17 attribute scores in [0, 1]:
    what is in the cell (size, colour, shape, or nothing) and the background. Flattened, so
    what is where survives, and every cell is read by the same weights. Trained jointly with
    the decoder, or first on the scores' labels (TrainConfig.pretrain_epochs) and then frozen.
    A chain of layers, so compression/shrink.py can cut its channels."""
    layers = keras.layers
    x = inp = keras.Input(shape, name="image")
    for i, filters in enumerate((24, 48, 96)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        # momentum 0.9: with 0.99 the moving statistics lag a short run and inference drifts
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
        x = layers.ReLU(name=f"relu{i + 1}")(x)
        x = layers.MaxPooling2D(name=f"pool{i + 1}")(x)  # 72 -> 36 -> 18 -> 9
    x = layers.MaxPooling2D(shape[0] // 8 // CELL_GRID, name="cell_pool")(x)  # 9x9 -> 3x3
    x = layers.Conv2D(16, 1, activation="relu", name="cells")(x)  # (B, 3, 3, 16)
    x = layers.Conv2D(CELL_SCORES, 1, name="cell_logits")(x)
    x = layers.Activation("sigmoid", name="cell_scores")(x)  # (B, 3, 3, 17)
    x = layers.Flatten(name="flatten")(x)  # (B, 153)
    assert x.shape[-1] == feature_dim, (x.shape, feature_dim)
    return keras.Model(inp, x, name="small_cnn")
