import gzip
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from capfleet.model import bundle
from capfleet.model.bundle import BundleError, BundleRunner, read_manifest
from capfleet.model.data import Flickr8kReader
from capfleet.model.evaluation import keras_caption_ids
from capfleet.model.features import load_images
from capfleet.model.images import preprocess
from capfleet.model.modeldir import load_trained


def test_model_directory_holds_weights_vocab_and_manifest(tiny_model):
    manifest = json.loads((tiny_model / "manifest.json").read_text())
    assert manifest["config"]["encoder"] == "small_cnn"
    assert manifest["train"]["units"] == 32 and manifest["epochs_run"] == 3
    assert set(manifest["test_metrics"]) >= {
        "bleu1",
        "bleu4",
        "cider_d",
        "rouge_l",
        "content_accuracy",
        "images",
    }
    assert (tiny_model / "weights.h5").read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"  # HDF5, not pickle


def test_bundle_manifest_sizes_and_hashes(tiny_bundle):
    m = read_manifest(tiny_bundle)
    assert set(m["files"]) == {"encoder.tflite", "decoder_step.tflite", "vocab.json"}
    for name, f in m["files"].items():
        assert f["bytes"] == (tiny_bundle / name).stat().st_size
        assert 0 < f["gzip_bytes"] < f["bytes"] * 1.01
    assert m["recipe"] == {"encoder": "fp32", "decoder": "fp32", "trial": "fp32:fp32"}
    assert m["size_mb"] == pytest.approx(
        sum(f["bytes"] for f in m["files"].values()) / 1e6, abs=1e-3
    )


def test_gzip_size_on_threads_is_the_size_of_a_valid_gzip_of_the_file(monkeypatch):
    monkeypatch.setattr(bundle, "GZIP_PIECE", 100_000)  # many pieces in a small file
    rng = np.random.default_rng(0)
    # weights-like bytes: float32 noise with runs of zeros, as a pruned model has
    data = (rng.standard_normal(250_000).astype(np.float32) * (rng.random(250_000) > 0.5)).tobytes()
    pieces = [bundle.deflate_piece(data, s) for s in range(0, len(data), 100_000)]
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    trailer = struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    whole = header + b"".join(pieces) + trailer
    assert len(pieces) == 10 and gzip.decompress(whole) == data
    for threads in (1, 3):
        assert bundle.gzip_bytes(data, threads) == len(whole)
    one_stream = len(gzip.compress(data, compresslevel=6, mtime=0))
    assert one_stream <= len(whole) <= one_stream * 1.001  # priming keeps the pieces' matches
    assert bundle.gzip_bytes(b"") == len(gzip.compress(b"", compresslevel=6, mtime=0))


def test_litert_bundle_captions_equal_keras(tiny_model, tiny_bundle, shapes_dir):
    recs = Flickr8kReader(shapes_dir, "test").records()
    images, _ = load_images(recs, 72)
    cap, backbone, vocab, _ = load_trained(tiny_model)
    keras_ids = keras_caption_ids(cap, backbone, images)
    runner = BundleRunner(tiny_bundle)
    lite_ids = runner.caption_ids(preprocess(images, "unit"))
    np.testing.assert_array_equal(lite_ids, keras_ids)
    assert runner.caption(images) == [vocab.decode(r) for r in keras_ids]


def test_bundle_runs_without_tensorflow(tiny_bundle, shapes_dir):
    code = f"""
import sys, numpy as np
from capfleet.model.bundle import BundleRunner
from capfleet.model.data import Flickr8kReader
from capfleet.model.features import load_images
images, _ = load_images(Flickr8kReader({str(shapes_dir)!r}, "test").records(), 72)
caps = BundleRunner({str(tiny_bundle)!r}, beam_width=2).caption(images)
assert len(caps) == len(images)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras", "keras"))
print("LEAKED" if leaked else "CLEAN", leaked[:5])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CLEAN" in out.stdout, out.stdout


def test_tampered_or_missing_bundle_files_are_refused(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    data = bytearray((copy / "decoder_step.tflite").read_bytes())
    data[-1] ^= 0xFF
    (copy / "decoder_step.tflite").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder_step.tflite does not match the manifest"):
        BundleRunner(copy)
    shutil.copy(tiny_bundle / "decoder_step.tflite", copy / "decoder_step.tflite")
    read_manifest(copy)  # restored: accepted again
    (copy / "vocab.json").unlink()
    with pytest.raises(BundleError, match="vocab.json is missing"):
        read_manifest(copy)
    with pytest.raises(BundleError, match="not a capfleet bundle"):
        BundleRunner(tmp_path)


def test_incomplete_manifest_and_wrong_image_shape_are_refused(tiny_bundle, tmp_path):
    import shutil

    from capfleet.core.errors import CapfleetError

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    del m["files"]["encoder.tflite"]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="lists no encoder.tflite"):
        BundleRunner(copy)
    runner = BundleRunner(tiny_bundle)
    with pytest.raises(CapfleetError, match=r"images must be \(B, 72, 72, 3\)"):
        runner.caption_ids(np.zeros((2, 32, 32, 3), np.float32))
    assert runner.caption_ids(np.zeros((0, 72, 72, 3), np.float32)).shape[0] == 0
    with pytest.raises(CapfleetError, match="beam_width"):
        BundleRunner(tiny_bundle, beam_width=0)


def test_a_bundle_that_could_not_caption_is_refused_before_any_work(tiny_bundle, tmp_path):
    import json
    import shutil

    from capfleet.model.bundle import BundleError, check_bundle, file_record

    def copy(name):
        d = tmp_path / name
        shutil.copytree(tiny_bundle, d)
        return d, json.loads((d / "manifest.json").read_text())

    def save(d, m):
        (d / "manifest.json").write_text(json.dumps(m))

    assert check_bundle(tiny_bundle)["name"] == "tiny-fp32"
    d, m = copy("empty")
    (d / "encoder.tflite").write_bytes(b"")
    m["files"]["encoder.tflite"] = file_record(b"")  # hashes that match: still unloadable
    save(d, m)
    with pytest.raises(BundleError, match="encoder.tflite: not a capfleet model LiteRT can load"):
        check_bundle(d)
    d, m = copy("size")
    m["encoder"]["input_size"] = 224
    save(d, m)
    with pytest.raises(
        BundleError, match=r"takes \[72, 72, 3\] -> 32, but the manifest says \[224"
    ):
        check_bundle(d)
    d, m = copy("vocab")
    vocab = json.loads((d / "vocab.json").read_text())
    vocab["tokens"] = vocab["tokens"][:-3]
    (d / "vocab.json").write_text(json.dumps(vocab))
    m["files"]["vocab.json"] = file_record((d / "vocab.json").read_bytes())
    save(d, m)
    with pytest.raises(BundleError, match="vocab.json has .* tokens, but the decoder scores"):
        check_bundle(d)
    d, m = copy("nofield")
    del m["config"]["units"]
    save(d, m)
    with pytest.raises(BundleError, match="lacks 'units'"):
        check_bundle(d)
