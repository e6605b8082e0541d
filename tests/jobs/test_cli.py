import subprocess
import sys

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
