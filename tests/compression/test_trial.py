"""One trial end to end, without Ray: tuned, converted, scored on the bundle itself."""

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from capfleet.compression.records import TRIAL_CAPTIONS_SCHEMA
from capfleet.compression.settings import TrialSettings, tuning_epochs
from capfleet.compression.trial import measure_bundle, run_trial
from capfleet.core.errors import CapfleetError
from capfleet.jobs.compress.compress_config import CompressConfig

QUICK = TrialSettings(finetune_epochs=1, eval_images=8, bench_batch=8, bench_repeats=1, threads=2)


def _tensors(path):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path)).get_tensor_details()


def _dtypes(path):
    return {np.dtype(t["dtype"]).name for t in _tensors(path)}


def _float_matrices(path):
    """Names of the float32 weight matrices left in a model (activations have a batch of 1)."""
    return [
        t["name"]
        for t in _tensors(path)
        if np.dtype(t["dtype"]) == np.float32 and len(t["shape"]) == 2 and min(t["shape"]) > 1
    ]


@pytest.mark.slow
def test_pruned_encoder_with_qat_decoder(tiny_model, tmp_path):
    rec = run_trial(tiny_model, "prune-50:qat-int8", tmp_path / "b", QUICK, log=lambda _: None)
    assert rec["status"] == "ok" and rec["trial"] == "prune-50:qat-int8"
    # tfmot reached its 50% in the CNN; the file also holds the unpruned image projection
    assert 0.4 < rec["encoder_sparsity"] <= 0.5
    assert rec["decoder_sparsity"] < 0.05
    assert rec["encoder_gzip_mb"] < 0.75 * rec["encoder_mb"]  # zeros pay only after gzip
    decoder = tmp_path / "b" / "decoder_step.tflite"
    assert "int8" in _dtypes(decoder)  # QAT made it integer...
    assert _float_matrices(decoder) == []  # ...the LSTM cell and embedding too, not only Dense
    assert 0.0 <= rec["bleu4"] <= rec["bleu1"] <= 1.0 and rec["test_images"] == 8
    timing = measure_bundle(rec["bundle"], rec["data"], QUICK)
    assert timing["e2e_ms"] > 0 and timing["encoder_ms"] > 0


def test_int8_is_smaller_and_integer(tiny_model, tiny_bundle, tmp_path):
    from capfleet.model.bundle import read_manifest

    captions = tmp_path / "int8.captions.parquet"
    rec = run_trial(tiny_model, "int8", tmp_path / "b", QUICK, lambda _: None, captions)
    # the captions it was scored on are kept, with each image's scores: their means are the
    # record's corpus CIDEr-D and ROUGE-L
    kept = pq.read_table(captions)
    assert kept.schema.equals(TRIAL_CAPTIONS_SCHEMA)
    rows = kept.to_pylist()
    assert len(rows) == rec["test_images"] == 8
    assert all(r["references"] and r["caption"] is not None for r in rows)
    for m in ("cider_d", "rouge_l"):
        assert rec[m] == pytest.approx(sum(r[m] for r in rows) / len(rows))
    assert rec["cider_d"] >= 0 and 0 <= rec["rouge_l"] <= 1
    assert all(0 <= r["sentence_bleu4"] <= 1 for r in rows)
    fp32 = read_manifest(tiny_bundle)
    assert rec["size_mb"] < 0.35 * fp32["size_mb"]
    assert "int8" in _dtypes(tmp_path / "b" / "encoder.tflite")
    assert read_manifest(tmp_path / "b")["quantizer"] == "tflite-converter"


def test_an_int8_trial_converting_its_encoder_apart_builds_the_same_bundle(
    tiny_model, tmp_path, monkeypatch
):
    """The decoder is calibrated and converted while the encoder converts in its own process:
    the bundle is the one a trial converting both in turn builds."""
    from capfleet.compression import convert, trial
    from capfleet.model.bundle import read_manifest

    here = run_trial(tiny_model, "int8", tmp_path / "here", QUICK, lambda _: None, tmp_path / "h")
    started = []

    def encoder_apart(*args, **kwargs):  # the tiny encoder apart, as VGG16's would be
        started.append(args[1])
        return convert.encoder_conversion(*args, **{**kwargs, "apart": True})

    monkeypatch.setattr(trial, "encoder_conversion", encoder_apart)
    apart = run_trial(tiny_model, "int8", tmp_path / "apart", QUICK, lambda _: None, tmp_path / "a")
    assert started == ["int8"]
    files = [read_manifest(tmp_path / b)["files"] for b in ("here", "apart")]
    assert files[0]["decoder_step.tflite"] == files[1]["decoder_step.tflite"]  # byte for byte
    assert "int8" in _dtypes(tmp_path / "apart" / "encoder.tflite")
    assert pq.read_table(tmp_path / "h").column("caption").to_pylist() == (
        pq.read_table(tmp_path / "a").column("caption").to_pylist()
    )
    assert (here["bleu4"], here["cider_d"]) == (apart["bleu4"], apart["cider_d"])


def test_a_shrunk_decoder_is_tuned_for_shrink_epochs(tiny_model, tmp_path, capfd):
    settings = dataclasses.replace(QUICK, finetune_epochs=1, shrink_epochs=2)
    rec = run_trial(tiny_model, "fp32:shrink-50", tmp_path / "b", settings, log=lambda _: None)
    assert rec["status"] == "ok" and rec["trial"] == "fp32:shrink-50"
    printed = capfd.readouterr().out  # Keras prints one line per epoch
    assert "Epoch 2/2" in printed and "Epoch 1/1" not in printed


def test_trials_are_costed_by_their_tuning_epochs():
    settings = TrialSettings(finetune_epochs=3, shrink_epochs=8)
    costs = {
        t: tuning_epochs(t, settings)
        for t in ("fp32", "int8", "qat-int8", "prune-50+int8", "int8:shrink-50", "shrink-50+int8")
    }
    assert costs == {
        "fp32": 0,
        "int8": 0,
        "qat-int8": 3,
        "prune-50+int8": 3,
        "int8:shrink-50": 8,  # the decoder alone
        "shrink-50+int8": 16,  # the CNN is re-pretrained, then the captioner tuned
    }


def test_a_bad_plan_is_refused_before_work(tiny_model, tmp_path):
    with pytest.raises(CapfleetError, match="unknown step"):
        CompressConfig(models=(str(tiny_model),), out=str(tmp_path), trials=("int3",))
    with pytest.raises(CapfleetError, match="share a name"):
        CompressConfig(models=(str(tiny_model), str(tiny_model)), out=str(tmp_path))
    plan = CompressConfig(models=(str(tiny_model),), out=str(tmp_path), trials=("int8",)).plan()
    assert [t for _, t in plan] == ["fp32:fp32", "int8:int8"]  # the baseline always runs


@pytest.fixture(scope="module")
def pretrained_model(shapes_dir, tmp_path_factory):
    """A small CNN pretrained on the shapes' cells and frozen, then a decoder trained on it."""
    from capfleet.model.train_config import TrainConfig
    from capfleet.model.training import train

    out = tmp_path_factory.mktemp("pretrained") / "m"
    cfg = TrainConfig(
        data=str(shapes_dir), out=str(out), units=16, embed_dim=8, epochs=1, pretrain_epochs=1
    )
    train(cfg, log=lambda _: None)
    return out


@pytest.mark.parametrize("trial", ["fp32:prune-50", "fp32:shrink-50"])
def test_decoder_tuning_keeps_a_frozen_cnn_frozen(pretrained_model, trial):
    """The CNN was pretrained and frozen: a decoder-only trial must not train it, nor let its
    BatchNorm statistics drift (they moved when load_trained rebuilt it trainable)."""
    from capfleet.compression.recipes import parse_trial
    from capfleet.compression.trial import tune
    from capfleet.model.modeldir import load_trained

    cap, backbone, vocab, manifest = load_trained(pretrained_model)
    before = [w.copy() for w in cap.encoder.get_weights()]  # kernels and BatchNorm statistics
    settings = dataclasses.replace(QUICK, finetune_epochs=1, shrink_epochs=1)
    tuned = tune(cap, backbone, manifest, vocab, parse_trial(trial), settings, lambda _: None)
    after = tuned.encoder.get_weights()
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)
