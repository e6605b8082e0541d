"""Training the captioner: one model directory from a TrainConfig, and the inputs that training
and fine-tuning feed the training graph (pixels, or a frozen backbone's cached features)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from capfleet.core.artifacts import package_versions, write_json_atomic
from capfleet.model.captioner import Captioner, CaptionerConfig
from capfleet.model.data import SPLITS, data_identity, read_split
from capfleet.model.encoders import build_encoder, encoder_info, encoder_section
from capfleet.model.evaluation import evaluate, evaluate_features
from capfleet.model.features import cached_features, find_cached, load_images
from capfleet.model.fitting import caption_sets, configure_threads, fit_captions, time_budget
from capfleet.model.images import preprocess
from capfleet.model.modeldir import (
    MANIFEST_FILE,
    MODEL_FORMAT,
    relative_to_model,
    save_trained,
    trained_config,
)
from capfleet.model.pretrain import pretrain_cells
from capfleet.model.text import Vocabulary, clean_caption
from capfleet.model.train_config import TrainConfig


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train one captioner and write its model directory. Returns the manifest written."""
    import tf_keras as keras

    configure_threads(cfg.threads)
    keras.utils.set_random_seed(cfg.seed)
    t0 = time.perf_counter()
    info = encoder_info(cfg.encoder)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # all three splits are read before any work, so a bad data set fails in seconds
    train_recs, dev_recs, test_recs = (read_split(cfg.data, s) for s in SPLITS)
    backbone = None if info.trainable else build_encoder(cfg.encoder, cfg.weights_arg)
    encoder = build_encoder(cfg.encoder, cfg.weights_arg) if info.trainable else None
    x_train, train_recs = split_inputs(train_recs, info, backbone, cfg, log)
    x_dev, dev_recs = split_inputs(dev_recs, info, backbone, cfg, log)
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

    if cfg.pretrain_epochs:
        pretrain_cells(encoder, x_train, train_recs, x_dev, dev_recs, cfg, log)
        encoder.trainable = False  # frozen from here on, BatchNorm in inference mode
    cap = Captioner(config, encoder=encoder)
    tokens = caption_sets(train_recs, vocab, max_len, cfg.captions_per_image)  # (N, K, T)
    dev_tokens = caption_sets(dev_recs, vocab, max_len, cfg.captions_per_image)
    callbacks = [time_budget(cfg.time_budget_s)]
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
    save_trained(out, cap, backbone, vocab, random_backbone=cfg.weights == "none")

    if info.trainable:
        metrics = evaluate(cap, backbone, vocab, test_recs, cfg.data, cfg.beam_width, log)
    else:  # scored from the test split's features (cached: the feature job computes them too)
        x_test, test_recs = split_inputs(test_recs, info, backbone, cfg, log)
        metrics = evaluate_features(cap, x_test, vocab, test_recs, cfg.data, cfg.beam_width)
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
        "data_identity": data_identity(cfg.data),  # a rerun on changed data retrains
        # the data set's path from the model directory, so that a copied or moved model (with
        # its data beside it) still finds it wherever it is run from (modeldir.model_data)
        "data_from_model": relative_to_model(cfg.data, out),
        "versions": package_versions("tensorflow", "tf-keras", "capfleet"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(out / MANIFEST_FILE, manifest)
    return manifest


def split_inputs(records, info, backbone, cfg: TrainConfig, log=print):
    """(model inputs, the records that decoded) of a split. A frozen backbone's features the
    cache already has are read without decoding an image (a Flickr8k-sized split is minutes
    of decoding on one core); otherwise the images are decoded and given to model_inputs."""
    if not info.trainable:
        hit = find_cached(cfg.feature_cache, info.name, cfg.weights_id, records)
        if hit is not None:
            log(f"features: cached, {len(hit[1])} images")
            return hit
    images, records = load_images(records, info.input_size, log, cfg.threads or os.cpu_count() or 1)
    return model_inputs(images, records, info, backbone, cfg, log), records


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


@dataclass(frozen=True)
class FinetuneData:
    """What compression fine-tunes a trained model on: its own data set's training and dev
    inputs with their token sets, and the TrainConfig it was trained with."""

    train: tuple  # (inputs, tokens (N, K, T))
    dev: tuple
    config: TrainConfig
    train_records: list
    dev_records: list


def finetune_data(cap: Captioner, backbone, manifest: dict, vocab: Vocabulary, log=print):
    """The FinetuneData of a trained model. A frozen backbone's features come from the feature
    cache the training wrote (computed again only if it is gone)."""
    cfg = trained_config(manifest)
    info = encoder_info(cap.config.encoder)
    splits, records_by_split = [], []
    for split in ("train", "dev"):
        x, records = split_inputs(read_split(cfg.data, split), info, backbone, cfg, log)
        tokens = caption_sets(records, vocab, cap.config.max_len, cfg.captions_per_image)
        splits.append((x, tokens))
        records_by_split.append(records)
    return FinetuneData(splits[0], splits[1], cfg, *records_by_split)
