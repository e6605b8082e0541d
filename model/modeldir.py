"""The model directory that `capfleet train` writes, and reading it back.

    MODEL/weights.h5            training-graph weights (HDF5), decoder and small CNN
    MODEL/encoder.weights.h5    only for a frozen backbone with random weights (to export it again)
    MODEL/vocab.json            the Vocabulary
    MODEL/manifest.json         config, the TrainConfig, history, test metrics, versions

Everything is rebuilt from the saved config; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from capfleet.core.artifacts import read_manifest_json
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import is_uri, place
from capfleet.model.captioner import Captioner, CaptionerConfig
from capfleet.model.encoders import build_encoder, encoder_info
from capfleet.model.text import Vocabulary
from capfleet.model.train_config import TrainConfig

MODEL_FORMAT = "capfleet-model/1"
MANIFEST_FILE = "manifest.json"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "weights.h5"  # HDF5, not pickle
ENCODER_WEIGHTS_FILE = "encoder.weights.h5"  # only for a frozen encoder with random weights


def read_model_manifest(model_dir: str | Path) -> dict:
    """A model directory's manifest, checked for its format and its config section."""
    d = place(model_dir)
    manifest = read_manifest_json(d / MANIFEST_FILE, MODEL_FORMAT, CapfleetError, "model directory")
    if not isinstance(manifest.get("config"), dict) or not isinstance(manifest.get("train"), dict):
        raise CapfleetError(f"{d / MANIFEST_FILE}: malformed (no config or train section)")
    return manifest


def trained_config(manifest: dict) -> TrainConfig:
    """The TrainConfig a model manifest records. A model trained before label smoothing existed
    was trained on plain cross-entropy, and is fine-tuned on it."""
    return TrainConfig(**{"label_smoothing": 0.0, **manifest["train"]})


def relative_to_model(data: str, model_dir: str | Path) -> str | None:
    """A local data set's path relative to the model directory (None for a URI)."""
    if "://" in data:
        return None
    return os.path.relpath(Path(data).resolve(), Path(model_dir).resolve())


def model_data(model_dir: str | Path, manifest: dict, override: str = "") -> str:
    """Where the data set a model was trained on is now: `override` (a compress spec's `data`)
    when given; else the path training was given, when absolute (or a URI) and there; else the
    path the manifest records from the model directory (it survives copying the model with its
    data); else the path as given, from here. Refused, naming the key to set, when none is
    there."""
    given = str(manifest.get("train", {}).get("data", ""))
    candidates = [override] if override else []
    if not override:
        if "://" in given or Path(given).is_absolute():
            candidates.append(given)
        rel = manifest.get("data_from_model")
        if rel and not is_uri(model_dir):
            candidates.append(str(Path(model_dir) / rel))
        if given not in candidates:
            candidates.append(given)
    for c in candidates:
        if c and ("://" in c or Path(c).exists()):
            return c
    tried = ", ".join(repr(c) for c in candidates if c)
    raise CapfleetError(
        f"{model_dir}: the data set it was trained on is not there ({tried}); set `data` in "
        "the compress spec ([compress] data = PATH) to where it is now"
    )


def manifest_sha256(model_dir: str | Path) -> str:
    """A trained model's identity: the sha256 of its manifest, which every training rewrites.
    Bundles record it as their source; a compress rerun redoes trials whose model it changed."""
    return hashlib.sha256((place(model_dir) / MANIFEST_FILE).read_bytes()).hexdigest()


def load_trained(model_dir: str | Path):
    """Rebuild a trained captioner from its directory: (Captioner, backbone, vocab, manifest).

    `backbone` is the frozen encoder (None for a jointly trained one, which lives in the
    Captioner).
    """
    d = Path(model_dir)
    manifest = read_model_manifest(d)
    try:
        config = CaptionerConfig(**manifest["config"])
        weights = manifest["encoder"]["weights"]
    except (KeyError, TypeError, AssertionError) as e:
        raise CapfleetError(f"{d / MANIFEST_FILE}: malformed config ({e})") from e
    vocab = Vocabulary.load(d / VOCAB_FILE)
    backbone = None
    try:
        if not encoder_info(config.encoder).trainable:
            if weights == "none":
                backbone = build_encoder(config.encoder, None)
                backbone.load_weights(str(d / ENCODER_WEIGHTS_FILE))
            else:
                backbone = build_encoder(config.encoder, weights)
        cap = Captioner(config)
        cap.training_model.load_weights(str(d / WEIGHTS_FILE))
    except (OSError, ValueError) as e:
        raise CapfleetError(f"{d}: cannot load the model's weights ({e})") from e
    if cap.trainable_encoder and manifest["train"].get("pretrain_epochs"):
        # the CNN was pretrained, then frozen while the decoder learnt: it stays frozen (and
        # its BatchNorm in inference mode) unless a compression step means to change it
        cap.encoder.trainable = False
    return cap, backbone, vocab, manifest


def save_trained(out: Path, cap: Captioner, backbone, vocab: Vocabulary, random_backbone: bool):
    """The weights and vocabulary of a model directory, in the layout `load_trained` reads (the
    manifest is written last, by the trainer, so that a directory with one is complete)."""
    if cap.trainable_encoder:  # a frozen CNN lists its weights in another order than the
        cap.encoder.trainable = True  # trainable one that load_trained() builds
    cap.training_model.save_weights(str(out / WEIGHTS_FILE))
    if backbone is not None and random_backbone:
        backbone.save_weights(str(out / ENCODER_WEIGHTS_FILE))
    vocab.save(out / VOCAB_FILE)
