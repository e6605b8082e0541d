import subprocess
import sys

import pytest

from capfleet.jobs.cli import main
from capfleet.model.data import Flickr8kReader


def test_data_shapes_command_writes_flickr_layout(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path), "--images", "20", "--seed", "1"]) == 0
    assert "wrote 20 images (train 16, dev 2, test 2)" in capsys.readouterr().out
    assert len(Flickr8kReader(tmp_path, "train").records()) == 16


def test_user_errors_print_one_line_not_a_traceback(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "capfleet",
            "data",
            "shapes",
            "--out",
            str(tmp_path),
            "--images",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "images must be >= 3" in out.stderr


def test_train_and_export_commands(shapes_dir, tmp_path, capsys):
    spec = tmp_path / "train.toml"
    out = tmp_path / "m"
    spec.write_text(
        f'kind = "train"\n[train]\ndata = "{shapes_dir}"\nout = "{out}"\n'
        "units = 16\nembed_dim = 8\nepochs = 1\nbatch_size = 32\npatience = 0\n"
    )
    assert main(["train", str(spec)]) == 0
    assert (out / "manifest.json").is_file() and (out / "weights.h5").is_file()
    assert main(["export", str(out), "--out", str(tmp_path / "b")]) == 0
    assert "bundle written to" in capsys.readouterr().out
    assert (tmp_path / "b" / "decoder_step.tflite").is_file()


def test_export_of_a_non_model_is_a_clear_error(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "not a capfleet model directory" in capsys.readouterr().err


def test_a_submitted_spec_with_a_relative_path_is_refused_before_submission(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text(
        'kind = "caption"\n[caption]\nbundles = ["/abs/b"]\ninput = "runs/demo/data"\n'
        'out = "s3://bucket/out"\n'
    )
    # no cluster listens at that address: the refusal comes first
    assert main(["submit", str(spec), "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "caption.input = 'runs/demo/data' is a relative path" in err
    from capfleet.jobs.specs import relative_paths

    doc = {"pipeline": {"out": "/o", "data": {"path": "d", "images": 5}}, "kind": "pipeline"}
    assert relative_paths(doc) == ["pipeline.data.path = 'd'"]


def test_bundle_and_model_paths_say_what_they_are_and_what_to_run(
    tiny_model, tiny_bundle, tmp_path, capsys
):
    from capfleet.core.errors import CapfleetError
    from capfleet.jobs import api
    from capfleet.model.bundle import read_manifest

    with pytest.raises(CapfleetError, match="no such folder"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(CapfleetError, match="capfleet export MODEL --out BUNDLE"):
        read_manifest(tiny_model)  # a model directory given as a bundle
    with pytest.raises(CapfleetError, match="CaptionConfig has no field 'bundle'"):
        api.caption(bundle=str(tiny_bundle), input="x", out=str(tmp_path / "o"))
    with pytest.raises(CapfleetError, match="matches no folder"):
        api.caption(bundles=str(tmp_path / "*" / "int8"), input="x", out=str(tmp_path / "o"))
    from capfleet.jobs.caption.caption_config import CaptionConfig

    one = CaptionConfig(bundles=str(tiny_bundle), input="x", out=str(tmp_path / "o"))
    assert one.bundles == (str(tiny_bundle),)  # a string is one bundle, not its characters
    many = CaptionConfig(bundles=(str(tiny_bundle.parent / "*"),), input="x", out="o")
    assert str(tiny_bundle) in many.bundles
