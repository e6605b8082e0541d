import subprocess
import sys

from jobs.cli import main
from model.data import Flickr8kReader


def test_data_shapes_command_writes_flickr_layout(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path), "--images", "20", "--seed", "1"]) == 0
    assert "wrote 20 images (train 16, dev 2, test 2)" in capsys.readouterr().out
    assert len(Flickr8kReader(tmp_path, "train").records()) == 16


def test_user_errors_print_one_line_not_a_traceback(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
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
