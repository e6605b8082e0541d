"""Training with a frozen backbone: features computed once and cached, the model reloadable."""

import dataclasses
import shutil

import numpy as np
import pytest

from capfleet.core.errors import CapfleetError
from capfleet.model.data import Flickr8kReader
from capfleet.model.evaluation import keras_caption_ids, score_captions
from capfleet.model.features import load_images
from capfleet.model.fitting import caption_loss
from capfleet.model.modeldir import load_trained, trained_config
from capfleet.model.train_config import TrainConfig
from capfleet.model.training import train


@pytest.mark.slow
def test_frozen_encoder_features_are_cached_and_model_reloads(shapes_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfg = TrainConfig(
        data=str(shapes_dir),
        out=str(tmp_path / "m"),
        encoder="mobilenet_v2",
        weights="none",
        units=16,
        embed_dim=8,
        epochs=1,
        batch_size=16,
        patience=0,
        cache_dir=str(cache),
        threads=2,
    )
    logs: list[str] = []
    manifest = train(cfg, log=logs.append)
    assert any(line.startswith("features: computing mobilenet_v2") for line in logs)
    npys = sorted(cache.glob("mobilenet_v2-*.npy"))
    assert len(npys) == 3  # train, dev and test
    assert np.load(npys[0]).shape[1] == 1280
    assert manifest["encoder"]["weights"] == "none"
    assert len(manifest["history"]["val_nll"]) == 1  # plain dev cross-entropy beside the loss
    assert (tmp_path / "m" / "encoder.weights.h5").is_file()  # random backbone kept for export

    logs.clear()
    with monkeypatch.context() as m:  # trained again from the cache alone: no image decoded
        m.setattr("capfleet.model.features.decode_files", _no_decoding)
        manifest = train(cfg, log=logs.append)
    assert sum(line.startswith("features: cached") for line in logs) == 3
    assert not any(line.startswith("features: computing") for line in logs)

    # the reloaded model reproduces the test captions of the one that was trained
    cap, backbone, vocab, manifest = load_trained(tmp_path / "m")
    images, recs = load_images(Flickr8kReader(shapes_dir, "test").records(), 224)
    ids = keras_caption_ids(cap, backbone, images)
    assert ids.shape == (len(images), cap.config.max_len - 1)
    again = score_captions(recs, [vocab.decode(r) for r in ids], str(shapes_dir))
    assert again == {k: v for k, v in manifest["test_metrics"].items() if k != "data"}


def _no_decoding(*_):
    raise AssertionError("an image was decoded")


def test_training_data_without_splits_is_refused_before_work(tmp_path):
    import json as _json

    import pytest

    from capfleet.core.errors import CapfleetError
    from capfleet.model.data import read_split

    (tmp_path / "imgs").mkdir()
    with pytest.raises(CapfleetError, match="training needs train/dev/test splits"):
        read_split(str(tmp_path / "imgs"), "train")
    coco = tmp_path / "c.json"
    coco.write_text(_json.dumps({"images": [], "annotations": []}))
    with pytest.raises(CapfleetError, match="has no 'train' split"):
        read_split(str(coco), "train")


def test_pretraining_freezes_the_small_cnn_and_needs_the_sidecar(shapes_dir, tmp_path):
    cfg = TrainConfig(
        data=str(shapes_dir),
        out=str(tmp_path / "m"),
        units=16,
        embed_dim=8,
        epochs=1,
        patience=0,
        pretrain_epochs=1,
        threads=2,
    )
    lines = []
    manifest = train(cfg, log=lines.append)
    assert any(line.startswith("pretrain: 1 epochs") for line in lines)
    assert manifest["train"]["pretrain_epochs"] == 1
    cap, _, _, _ = load_trained(tmp_path / "m")  # the pretrained CNN is in weights.h5
    assert cap.encoder.get_layer("cell_scores").output.shape[1:] == (3, 3, 17)

    bare = tmp_path / "bare"
    shutil.copytree(shapes_dir, bare)
    (bare / "shapes_objects.jsonl").unlink()
    with pytest.raises(CapfleetError, match="no shapes_objects.jsonl"):
        train(dataclasses.replace(cfg, data=str(bare), out=str(tmp_path / "m2")), log=print)
    with pytest.raises(CapfleetError, match="only the small CNN is pretrained"):
        TrainConfig(data="d", out="o", encoder="mobilenet_v2", pretrain_epochs=1)


def test_label_smoothing_loss_is_its_definition_and_ignores_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 3, 5)).astype(np.float32)
    tokens = np.array([[1, 4, 0], [2, 0, 0]])  # 0 = padding
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    real = tokens != 0
    for eps in (0.0, 0.2):
        target = (1 - eps) * np.eye(5)[tokens] + eps / 5
        expected = (-(target * logp).sum(-1) * real).sum() / real.sum()
        assert float(caption_loss(eps)(tokens, logits)) == pytest.approx(expected, rel=1e-5)
    moved = logits.copy()
    moved[~real] += 100.0  # what the model says after the caption ended does not count
    assert float(caption_loss(0.2)(tokens, moved)) == pytest.approx(
        float(caption_loss(0.2)(tokens, logits)), rel=1e-6
    )
    with pytest.raises(CapfleetError, match="label_smoothing: must be in"):
        TrainConfig(data="d", out="o", label_smoothing=1.0)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_the_loss_keras_fits_is_the_loss_of_the_real_next_tokens(eps):
    """Under fit, Keras passes the training graph's (M,) targets in as (M, 1): the loss it
    reports must still be the definition's, computed from the logits one batch at a time."""
    import tf_keras as keras

    from capfleet.model.captioner import Captioner, CaptionerConfig
    from capfleet.model.fitting import caption_batches

    keras.utils.set_random_seed(0)
    cap = Captioner(CaptionerConfig("mobilenet_v2", vocab_size=30, max_len=9, units=8))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, cap.config.feature_dim)).astype(np.float32)
    tokens = np.zeros((40, 2, 9), np.int32)
    for i, j in np.ndindex(40, 2):
        n = int(rng.integers(1, 8))
        tokens[i, j, : n + 2] = [2, *rng.integers(4, 30, n), 3]
    model = cap.training_model
    model.compile(loss=caption_loss(eps))
    for (xb, tb), yb in caption_batches(x, tokens, 40):  # one batch: the whole set
        logits = model([xb, tb], training=False)
        assert logits.shape == (int((tokens[:, :, 1:] != 0).sum()), 30)
        direct = float(caption_loss(eps)(yb, logits))
        logp = logits.numpy() - np.log(np.exp(logits.numpy()).sum(-1, keepdims=True))
        target = (1 - eps) * np.eye(30)[yb.numpy()] + eps / 30
        assert direct == pytest.approx(float(-(target * logp).sum(-1).mean()), rel=1e-5)
    assert model.evaluate(caption_batches(x, tokens, 40), verbose=0) == pytest.approx(
        direct, rel=1e-5
    )


def test_models_trained_before_label_smoothing_are_tuned_without_it():
    old = {"train": {"data": "d", "out": "o"}}
    assert trained_config(old).label_smoothing == 0.0
    assert TrainConfig(data="d", out="o").label_smoothing == 0.1
    new = {"train": {"data": "d", "out": "o", "label_smoothing": 0.2}}
    assert trained_config(new).label_smoothing == 0.2


@pytest.mark.slow
def test_feature_worker_runs_the_backbones_litert_flatbuffer_as_keras_computes_it(
    shapes_dir, tmp_path
):
    """The feature job runs the frozen backbone as its fp32 LiteRT flatbuffer; its features
    are Keras's within 1e-4 of their scale, and the flatbuffer is made once per backbone.
    ResNet50: with random weights its features are far from zero (MobileNetV2's vanish)."""
    import tf_keras as keras

    from capfleet.compression.export import export_backbone
    from capfleet.jobs.train.feature_job import FeatureWorker
    from capfleet.model.encoders import build_encoder
    from capfleet.model.features import backbone_file, decode_files
    from capfleet.model.images import preprocess

    path = backbone_file(tmp_path, "resnet50", "none-seed3")
    assert path != backbone_file(tmp_path, "resnet50", "none-seed4")  # named by the backbone
    export_backbone("resnet50", None, 3, path)
    made = path.stat().st_mtime_ns
    assert export_backbone("resnet50", None, 3, path) == path
    assert path.stat().st_mtime_ns == made  # kept, not converted again
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    uris = [r.uri for r in Flickr8kReader(str(shapes_dir), "train").records()[:5]]
    worker = FeatureWorker(path, "resnet50", batch=2)  # batches of 2, 2 and 1 (padded)
    litert_feats, kept, bad = worker.features([*uris[:2], str(tmp_path / "bad.jpg"), *uris[2:]])
    assert kept == [0, 1, 3, 4, 5] and len(bad) == 1 and "bad.jpg" in bad[0]
    assert litert_feats.shape == (5, 2048) and litert_feats.dtype == np.float32

    keras.utils.set_random_seed(3)
    backbone = build_encoder("resnet50", None)
    images, _, _ = decode_files(uris, 224)
    keras_feats = backbone.predict(preprocess(np.stack(images), "caffe"), verbose=0)
    scale = float(np.abs(keras_feats).max())
    assert scale > 1.0  # features, not zeros
    assert float(np.abs(litert_feats - keras_feats).max()) <= 1e-4 * scale


def test_a_feature_worker_refuses_a_file_that_is_no_backbone(tmp_path):
    from capfleet.jobs.train.feature_job import FeatureWorker

    (tmp_path / "x.tflite").write_bytes(b"")
    with pytest.raises(CapfleetError, match="x.tflite: not a backbone LiteRT can load"):
        FeatureWorker(tmp_path / "x.tflite", "vgg16")


def test_images_decoded_on_threads_equal_one_by_one(shapes_dir, tmp_path):
    from capfleet.model.features import decode_files

    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    uris = [r.uri for r in Flickr8kReader(shapes_dir, "test").records()]
    uris = uris[:5] + [str(tmp_path / "bad.jpg"), str(tmp_path / "gone.jpg")] + uris[5:]
    one, kept1, bad1 = decode_files(uris, 72)
    many, kept2, bad2 = decode_files(uris, 72, workers=3)
    assert kept1 == kept2 == [i for i in range(len(uris)) if i not in (5, 6)]
    assert bad1 == bad2 and len(bad1) == 2 and "gone.jpg" in bad1[1]
    assert all(np.array_equal(a, b) for a, b in zip(one, many, strict=True))
