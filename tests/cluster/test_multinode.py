"""Jobs on a multi-node cluster on this machine (head + two worker nodes), one worker node
removed mid-job: a caption job still ends complete, no duplicates; a feature job resumes and
gives the features one process computes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # make test-slow


def run_script(name: str, *args, timeout: int) -> dict:
    """Run a multi-node script (one Ray cluster per process) and return its RESULT JSON."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(name)), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT ") :])


def test_caption_job_survives_losing_a_node(tiny_bundle, shapes_dir, tmp_path):
    images = sorted((Path(shapes_dir) / "Flicker8k_Dataset").glob("*.jpg"))
    rows = [f"{k}-{p.stem},{p}" for k in range(25) for p in images]  # 2000 rows, 40 shards
    (tmp_path / "m.csv").write_text("image_id,path\n" + "\n".join(rows) + "\n")
    r = run_script(
        "multinode_caption.py", tiny_bundle, tmp_path / "m.csv", tmp_path / "o", timeout=420
    )
    assert r["loopback"] == ["127.0.0.1"]
    assert r["actor_nodes"] == r["worker_node_ids"], "the actors did not land on both workers"
    assert r["parts_before_removal"] < 40, "the node was removed after the job had finished"
    assert r["finished"] and r["rows"] == r["distinct"] == r["ok"] == len(rows)


def test_features_across_two_nodes_resume_after_losing_one(tmp_path):
    from capfleet.model import shapes

    shapes.generate(tmp_path / "data", images=150, seed=2)  # 120 train images: 15 parts
    r = run_script("multinode_features.py", tmp_path / "data", tmp_path / "o", timeout=480)
    assert r["loopback"] == ["127.0.0.1"]
    assert r["part_nodes_before_removal"] == r["worker_node_ids"], "not both nodes computed"
    assert r["parts_before_removal"] < 15, "the node was removed after the job had finished"
    assert r["parts"] == 15 and r["shape"] == r["alone_shape"] == [120, 1280]
    # the same features as one process computes in Keras (the job runs LiteRT), relative to
    # their scale: a random MobileNetV2's features are small
    assert r["scale"] > 0 and r["max_abs_diff"] <= 1e-4 * r["scale"]
