"""Pretraining the small CNN on the shapes data set's per-cell object labels, the way a backbone
is pretrained on ImageNet, before it is frozen and the decoder learns the captions."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from capfleet.core.errors import CapfleetError
from capfleet.model.train_config import TrainConfig

PRETRAIN_LEARNING_RATE = 0.002


def pretrain_cells(encoder, x_train, train_recs, x_dev, dev_recs, cfg: TrainConfig, log) -> None:
    """Pretrain the small CNN on the shapes generator's per-cell object labels: its 17 scores
    per cell learn size, colour and shape (or nothing) and the background (binary
    cross-entropy on one-hot groups, Adam at PRETRAIN_LEARNING_RATE). Labels of the training
    split only; dev for the accuracy reported; the test split is never seen."""
    import tf_keras as keras

    from capfleet.model import shapes

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
