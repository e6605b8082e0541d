"""Training the captioner by teacher forcing, saving it, loading it back, and evaluating it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from model.artifacts import package_versions, read_manifest_json, write_json_atomic
from model.captioner import Captioner, CaptionerConfig
from model.data import CocoReader, Flickr8kReader, ImageRecord, open_reader
from model.decoding import decode
from model.encoders import ENCODERS, build_encoder, check_weights, encoder_info
from model.errors import CapfleetError
from model.features import cached_features, load_images
from model.images import preprocess
from model.metrics import corpus_bleu_scores
from model.text import Vocabulary, clean_caption

MODEL_FORMAT = "capfleet-model/1"
WEIGHTS_FILE = "weights.h5"  # HDF5, not pickle
ENCODER_WEIGHTS_FILE = "encoder.weights.h5"  # only for a frozen encoder with random weights


# variants.parquet: one row per trained variant of a train job with a [grid].
VARIANT_SCHEMA = pa.schema(
    [
        ("variant", pa.string()),  # the grid values that make it, e.g. "learning_rate=0.003"
        ("model_dir", pa.string()),
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),
        ("encoder", pa.string()),
        ("weights", pa.string()),
        ("units", pa.int32()),
        ("embed_dim", pa.int32()),
        ("dropout", pa.float64()),
        ("learning_rate", pa.float64()),
        ("label_smoothing", pa.float64()),
        ("batch_size", pa.int32()),
        ("seed", pa.int32()),
        ("epochs_run", pa.int32()),
        ("train_seconds", pa.float64()),
        ("bleu1", pa.float64()),  # Keras greedy captions of the test split
        ("bleu2", pa.float64()),
        ("bleu3", pa.float64()),
        ("bleu4", pa.float64()),
        ("content_accuracy", pa.float64()),  # shapes data only
        ("spec", pa.string()),  # the variant's whole TrainConfig, JSON
        ("started", pa.float64()),  # Unix time
        ("finished", pa.float64()),
    ]
)


def variant_row(name: str, cfg: TrainConfig, manifest: dict | None, error: str | None) -> dict:
    """A variants.parquet row for a trained (manifest) or failed (error) variant."""
    m = (manifest or {}).get("test_metrics", {})
    return {
        "variant": name,
        "model_dir": cfg.out,
        "status": "ok" if manifest else "error",
        "error": error,
        **{k: getattr(cfg, k) for k in ("encoder", "weights", "units", "embed_dim")},
        **{k: getattr(cfg, k) for k in ("dropout", "learning_rate", "label_smoothing")},
        **{k: getattr(cfg, k) for k in ("batch_size", "seed")},
        "epochs_run": (manifest or {}).get("epochs_run"),
        "train_seconds": (manifest or {}).get("train_seconds"),
        **{k: m.get(k) for k in ("bleu1", "bleu2", "bleu3", "bleu4", "content_accuracy")},
        "spec": json.dumps(asdict(cfg), sort_keys=True),
    }


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Validated on construction: a bad value names the field."""

    data: str  # a Flickr8k-layout directory or a COCO/Karpathy captions JSON
    out: str  # the model directory to write
    encoder: str = "small_cnn"
    weights: str = "none"  # "imagenet", "none" (random, seeded) or a weights file
    units: int = 256
    embed_dim: int = 256
    dropout: float = 0.5
    epochs: int = 40
    batch_size: int = 16  # images per step; each brings captions_per_image captions
    captions_per_image: int = 5
    learning_rate: float = 1e-3
    # Share of each target word's probability spread evenly over the vocabulary. It keeps the
    # logits' range to a few units instead of a hundred, which a post-training int8 decoder
    # can resolve (README: compression); 0 = plain cross-entropy.
    label_smoothing: float = 0.1
    patience: int = 4  # epochs without a better dev loss before stopping
    min_count: int = 1
    max_len: int = 0  # caption tokens incl. start/end; 0 = longest training caption
    time_budget_s: float = 0.0  # stop after the epoch that passes this; 0 = no limit
    seed: int = 0
    threads: int = 0  # TensorFlow threads; 0 = every core
    cache_dir: str = ""  # frozen-encoder features; "" = <out>/../feature_cache
    beam_width: int = 1  # decoding for the test-split evaluation
    # Small CNN on the shapes data only: epochs of pretraining on the generator's per-cell
    # object labels (shapes_objects.jsonl, training split) before captioning; the encoder is
    # then frozen, as a pretrained backbone is (the study's recipe). 0 = trained jointly.
    pretrain_epochs: int = 0

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise CapfleetError(
                f"encoder: {self.encoder!r} is not one of {', '.join(sorted(ENCODERS))}"
            )
        check_weights(self.encoder, self.weights_arg)
        positive = (
            "units",
            "embed_dim",
            "epochs",
            "batch_size",
            "captions_per_image",
            "min_count",
            "beam_width",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise CapfleetError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.pretrain_epochs and not encoder_info(self.encoder).trainable:
            raise CapfleetError(
                f"pretrain_epochs: only the small CNN is pretrained here; {self.encoder} "
                "comes with its own weights"
            )
        for name in ("patience", "max_len", "threads", "time_budget_s", "pretrain_epochs"):
            if getattr(self, name) < 0:
                raise CapfleetError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise CapfleetError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.learning_rate < 1.0:
            raise CapfleetError(f"learning_rate: must be in (0, 1), got {self.learning_rate}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise CapfleetError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if 0 < self.max_len < 3:
            raise CapfleetError(f"max_len: must be 0 (auto) or >= 3, got {self.max_len}")

    @property
    def weights_arg(self) -> str | None:
        return None if self.weights == "none" else self.weights

    @property
    def weights_id(self) -> str:
        """What a frozen backbone's features depend on: its weights, or the seed of random ones."""
        return self.weights if self.weights != "none" else f"none-seed{self.seed}"

    @property
    def feature_cache(self) -> str:
        return self.cache_dir or str(Path(self.out).parent / "feature_cache")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def configure_threads(threads: int) -> None:
    """Limit TensorFlow to `threads` cores (0 = all); must run before TensorFlow does work."""
    import tensorflow as tf

    n = threads or os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(min(n, 2))
    except RuntimeError:
        pass  # TensorFlow already started in this process: its thread pools are fixed


class KerasStep:
    """The Keras step graph as a decoding step function (numpy in, numpy out)."""

    def __init__(self, step_model):
        import tensorflow as tf

        self._fn = tf.function(lambda t, h, c, i: step_model([t, h, c, i], training=False))

    def __call__(self, tokens, h, c, img_proj):
        logits, h2, c2 = self._fn(tokens, h, c, img_proj)
        return logits.numpy(), h2.numpy(), c2.numpy()


def read_split(data: str, split: str) -> list[ImageRecord]:
    """The captioned images of one split of a training data set.

    Only formats that define splits can train (a Flickr8k layout, Karpathy's split JSON):
    anything else would test on the training images.
    """
    reader = open_reader(data, split)
    if not isinstance(reader, (Flickr8kReader, CocoReader)):
        raise CapfleetError(
            f"{data}: training needs train/dev/test splits: give a Flickr8k-layout directory "
            "or Karpathy's dataset_*.json"
        )
    records = [r for r in reader.records() if r.captions]
    if not records:
        raise CapfleetError(f"{data}: the {split} split has no captioned images")
    return records


def caption_sets(records: Sequence[ImageRecord], vocab: Vocabulary, max_len: int, k: int):
    """(N, k, max_len) token ids: k captions per image, cycling an image's captions when it
    has fewer than k and keeping the first k when it has more."""
    out = np.zeros((len(records), k, max_len), np.int32)
    for i, r in enumerate(records):
        caps = [clean_caption(r.captions[j % len(r.captions)]) for j in range(k)]
        out[i] = vocab.encode_batch(caps, max_len)
    return out


def _time_budget(seconds: float):
    """A Keras callback that stops training after the epoch in which `seconds` run out."""
    import tf_keras as keras

    class TimeBudget(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if seconds and time.perf_counter() - self.start > seconds:
                self.model.stop_training = True

    return TimeBudget()


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train one captioner and write its model directory. Returns the manifest written."""
    import tf_keras as keras

    configure_threads(cfg.threads)
    keras.utils.set_random_seed(cfg.seed)
    t0 = time.perf_counter()
    info = encoder_info(cfg.encoder)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # all three splits are checked before any work, so a bad data set fails in seconds
    train_recs, dev_recs, test_recs = (read_split(cfg.data, s) for s in ("train", "dev", "test"))
    train_imgs, train_recs = load_images(train_recs, info.input_size, log)
    dev_imgs, dev_recs = load_images(dev_recs, info.input_size, log)
    vocab = Vocabulary.build(
        (clean_caption(c) for r in train_recs for c in r.captions), cfg.min_count
    )
    longest = max(len(clean_caption(c).split()) for r in train_recs for c in r.captions) + 2
    max_len = cfg.max_len or longest
    config = CaptionerConfig(
        cfg.encoder, len(vocab), max_len, cfg.units, cfg.embed_dim, cfg.dropout
    )
    log(
        f"train: {len(train_recs)} images, dev {len(dev_recs)}, vocabulary {len(vocab)}, "
        f"max_len {max_len}, encoder {cfg.encoder} ({cfg.weights})"
    )

    backbone = None if info.trainable else build_encoder(cfg.encoder, cfg.weights_arg)
    encoder = build_encoder(cfg.encoder, cfg.weights_arg) if info.trainable else None
    x_train = model_inputs(train_imgs, train_recs, info, backbone, cfg, log)
    x_dev = model_inputs(dev_imgs, dev_recs, info, backbone, cfg, log)
    del train_imgs, dev_imgs

    if cfg.pretrain_epochs:
        pretrain_cells(encoder, x_train, train_recs, x_dev, dev_recs, cfg, log)
        encoder.trainable = False  # frozen from here on, BatchNorm in inference mode
    cap = Captioner(config, encoder=encoder)
    tokens = caption_sets(train_recs, vocab, max_len, cfg.captions_per_image)  # (N, K, T)
    dev_tokens = caption_sets(dev_recs, vocab, max_len, cfg.captions_per_image)
    callbacks = [_time_budget(cfg.time_budget_s)]
    if cfg.patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=cfg.patience, restore_best_weights=True
            )
        )
    history = fit_captions(
        cap.training_model,
        (x_train, tokens),
        (x_dev, dev_tokens),
        cfg.epochs,
        cfg.batch_size,
        cfg.learning_rate,
        cfg.seed,
        callbacks,
        label_smoothing=cfg.label_smoothing,
    )
    train_s = time.perf_counter() - t0
    if encoder is not None:  # save in the layout load_trained() builds (a trainable CNN):
        encoder.trainable = True  # a frozen model lists its weights in another order
    cap.training_model.save_weights(str(out / WEIGHTS_FILE))
    if backbone is not None and cfg.weights == "none":
        backbone.save_weights(str(out / ENCODER_WEIGHTS_FILE))
    vocab.save(out / "vocab.json")

    metrics = evaluate(cap, backbone, vocab, test_recs, cfg.data, cfg.beam_width, log)
    metrics["data"] = cfg.data
    scores = " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float))
    log(f"test: {scores}")
    manifest = {
        "format": MODEL_FORMAT,
        "config": config.to_dict(),
        "train": asdict(cfg),
        "encoder": encoder_section(cfg.encoder, cfg.weights),
        "history": {k: [round(float(x), 5) for x in v] for k, v in history.history.items()},
        "epochs_run": len(history.history["loss"]),
        "train_seconds": round(train_s, 1),
        "test_metrics": metrics,
        "versions": package_versions("tensorflow", "tf-keras", "capfleet"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


PRETRAIN_LEARNING_RATE = 0.002


def pretrain_cells(encoder, x_train, train_recs, x_dev, dev_recs, cfg: TrainConfig, log) -> None:
    """Pretrain the small CNN on the shapes generator's per-cell object labels: its 17 scores
    per cell learn size, colour and shape (or nothing) and the background (binary
    cross-entropy on one-hot groups, Adam at PRETRAIN_LEARNING_RATE). Labels of the training
    split only; dev for the accuracy reported; the test split is never seen."""
    import tf_keras as keras

    from model import shapes

    sidecar = Path(cfg.data) / shapes.SIDECAR
    if not sidecar.is_file():
        raise CapfleetError(
            f"pretrain_epochs: {cfg.data} has no {shapes.SIDECAR} (only the shapes data set can "
            "pretrain the small CNN); set pretrain_epochs = 0"
        )
    scenes = shapes.load_objects(cfg.data)
    y_train = shapes.cell_targets([scenes[r.image_id] for r in train_recs])
    y_dev = shapes.cell_targets([scenes[r.image_id] for r in dev_recs])
    model = keras.Model(encoder.input, encoder.get_layer("cell_scores").output)
    model.compile(
        optimizer=keras.optimizers.Adam(PRETRAIN_LEARNING_RATE),
        loss=keras.losses.BinaryCrossentropy(),
    )
    t0 = time.perf_counter()
    model.fit(x_train, y_train, epochs=cfg.pretrain_epochs, batch_size=cfg.batch_size, verbose=2)
    pred = model.predict(x_dev, batch_size=64, verbose=0)
    accs = {
        k: float(np.mean(pred[..., a:b].argmax(-1) == y_dev[..., a:b].argmax(-1)))
        for k, (a, b) in shapes.CELL_GROUPS.items()
    }
    log(
        f"pretrain: {cfg.pretrain_epochs} epochs in {time.perf_counter() - t0:.0f} s; dev "
        "per-cell accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in accs.items())
    )


def warm_feature_cache(cfg: TrainConfig, log: Callable[[str], None] = print) -> None:
    """Compute a frozen backbone's train and dev features into the cache that `train(cfg)`
    reads, so that variants sharing a backbone compute them once (a no-op for the small CNN)."""
    import tf_keras as keras

    info = encoder_info(cfg.encoder)
    if info.trainable:
        return
    configure_threads(cfg.threads)
    keras.utils.set_random_seed(cfg.seed)  # as train(): a random backbone is the same one
    backbone = build_encoder(cfg.encoder, cfg.weights_arg)
    for split in ("train", "dev"):
        images, records = load_images(read_split(cfg.data, split), info.input_size, log)
        model_inputs(images, records, info, backbone, cfg, log)


def model_inputs(images, records, info, backbone, cfg: TrainConfig, log=print):
    """What the training graph takes for these images: preprocessed pixels for a jointly
    trained encoder, a frozen backbone's features (cached on disk, computed once) otherwise."""
    if info.trainable:
        return preprocess(images, info.preprocess)
    return cached_features(
        backbone,
        info.name,
        cfg.weights_id,
        info.preprocess,
        images,
        records,
        cfg.feature_cache,
        log=log,
    )


def fit_captions(
    model,
    train_data,
    dev_data,
    epochs,
    batch_size,
    learning_rate,
    seed,
    callbacks,
    *,
    label_smoothing: float,
):
    """Teacher forcing: (inputs, tokens (N, K, T)) -> fit `model` to predict each next token,
    ignoring padding. Returns the Keras History; besides the loss it holds `nll` and `val_nll`,
    the plain cross-entropy, which stays comparable across label smoothings.

    Fine-tuning passes the label smoothing the model was trained with: the same loss."""
    import tensorflow as tf
    import tf_keras as keras

    (x, tokens), (x_dev, dev_tokens) = train_data, dev_data
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=caption_loss(label_smoothing),
        metrics=[
            keras.metrics.SparseCategoricalCrossentropy(
                name="nll", from_logits=True, ignore_class=0
            )
        ],
    )
    ds = (
        tf.data.Dataset.from_tensor_slices(((x, tokens[:, :, :-1]), tokens[:, :, 1:]))
        .shuffle(len(tokens), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .prefetch(2)
    )
    return model.fit(
        ds,
        epochs=epochs,
        validation_data=((x_dev, dev_tokens[:, :, :-1]), dev_tokens[:, :, 1:]),
        validation_batch_size=64,
        callbacks=callbacks,
        verbose=2,
    )


def trained_config(manifest: dict) -> TrainConfig:
    """The TrainConfig a model manifest records. A model trained before label smoothing existed
    was trained on plain cross-entropy, and is fine-tuned on it."""
    return TrainConfig(**{"label_smoothing": 0.0, **manifest["train"]})


def caption_loss(label_smoothing: float):
    """Cross-entropy of the next token, padding (id 0) ignored; with label smoothing e the target
    is (1 - e) on the true token plus e spread evenly over the vocabulary."""
    import tensorflow as tf
    import tf_keras as keras

    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)

    def smoothed_cross_entropy(tokens, logits):
        tokens = tf.cast(tokens, tf.int32)
        vocab = tf.shape(logits)[-1]
        target = (1.0 - label_smoothing) * tf.one_hot(tokens, vocab) + label_smoothing / tf.cast(
            vocab, logits.dtype
        )
        per_token = -tf.reduce_sum(target * tf.nn.log_softmax(logits), axis=-1)
        real = tf.cast(tokens != 0, logits.dtype)
        return tf.reduce_sum(per_token * real) / tf.maximum(tf.reduce_sum(real), 1.0)

    return smoothed_cross_entropy


def finetune_data(cap: Captioner, backbone, manifest: dict, vocab: Vocabulary, log=print):
    """The training and dev inputs of a trained model's own data set, for fine-tuning it:
    ((x_train, tokens), (x_dev, tokens), TrainConfig, [train records, dev records]). A frozen
    backbone's features come from the feature cache the training wrote (computed again only if
    it is gone)."""
    cfg = trained_config(manifest)
    info = encoder_info(cap.config.encoder)
    splits, records_by_split = [], []
    for split in ("train", "dev"):
        images, records = load_images(read_split(cfg.data, split), info.input_size, log)
        x = model_inputs(images, records, info, backbone, cfg, log)
        tokens = caption_sets(records, vocab, cap.config.max_len, cfg.captions_per_image)
        splits.append((x, tokens))
        records_by_split.append(records)
    return splits[0], splits[1], cfg, records_by_split


def encoder_section(name: str, weights: str) -> dict:
    """The `encoder` section of model and bundle manifests: what a runner needs to feed it."""
    info = encoder_info(name)
    return {
        "name": name,
        "weights": weights,
        "input_size": info.input_size,
        "preprocess": info.preprocess,
    }


def manifest_sha256(model_dir: str | Path) -> str:
    """A trained model's identity: the sha256 of its manifest, which every training rewrites.
    Bundles record it as their source; a compress rerun redoes trials whose model it changed."""
    return hashlib.sha256((Path(model_dir) / "manifest.json").read_bytes()).hexdigest()


def load_trained(model_dir: str | Path):
    """Rebuild a trained captioner from its directory: (Captioner, backbone, vocab, manifest).

    `backbone` is the frozen encoder (None for a jointly trained one, which lives in the
    Captioner). Everything is rebuilt from the saved config; nothing is unpickled.
    """
    d = Path(model_dir)
    manifest = read_manifest_json(
        d / "manifest.json", MODEL_FORMAT, CapfleetError, "model directory"
    )
    try:
        config = CaptionerConfig(**manifest["config"])
        weights = manifest["encoder"]["weights"]
    except (KeyError, TypeError, AssertionError) as e:
        raise CapfleetError(f"{d}/manifest.json: malformed config ({e})") from e
    vocab = Vocabulary.load(d / "vocab.json")
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
    return cap, backbone, vocab, manifest


def keras_caption_ids(
    cap: Captioner, backbone, images: np.ndarray, beam_width: int = 1, batch_size: int = 256
) -> np.ndarray:
    """RGB uint8 images -> generated ids with the Keras graphs (the reference for bundles)."""
    info = encoder_info(cap.config.encoder)
    enc = cap.encoder_model(backbone)
    step = KerasStep(cap.step_model())
    out = []
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i : i + batch_size], info.preprocess)
        out.append(decode(step, enc.predict_on_batch(x), cap.config.max_len, beam_width))
    return np.concatenate(out)


def score_captions(
    records: Sequence[ImageRecord], captions: Sequence[str], data_dir: str | None = None
) -> dict:
    """BLEU-1..4 against the records' references, and shapes content accuracy where the data
    set has the shapes sidecar."""
    from model import shapes

    refs = [[clean_caption(c) for c in r.captions] for r in records]
    metrics: dict = corpus_bleu_scores(refs, list(captions))
    if data_dir and (Path(data_dir) / shapes.SIDECAR).is_file():
        scenes = shapes.load_objects(data_dir)
        by_id = {r.image_id: c for r, c in zip(records, captions, strict=True)}
        metrics["content_accuracy"] = shapes.content_accuracy(by_id, scenes)
    metrics["images"] = len(records)
    return metrics


def evaluate(
    cap: Captioner,
    backbone,
    vocab: Vocabulary,
    records,
    data_dir: str,
    beam_width: int = 1,
    log: Callable[[str], None] = print,
) -> dict:
    """Caption the records with the Keras graphs and score them."""
    images, records = load_images(records, encoder_info(cap.config.encoder).input_size, log)
    ids = keras_caption_ids(cap, backbone, images, beam_width)
    return score_captions(records, [vocab.decode(row) for row in ids], data_dir)
