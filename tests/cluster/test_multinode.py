"""A caption job on a multi-node cluster on this machine (head + two worker nodes), one worker
node removed mid-job: the job still ends complete, no duplicates."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_caption_job_survives_losing_a_node(tiny_bundle, shapes_dir, tmp_path):
    images = sorted((Path(shapes_dir) / "Flicker8k_Dataset").glob("*.jpg"))
    rows = [f"{k}-{p.stem},{p}" for k in range(25) for p in images]  # 2000 rows, 40 shards
    (tmp_path / "m.csv").write_text("image_id,path\n" + "\n".join(rows) + "\n")
    script = Path(__file__).with_name("multinode_caption.py")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tiny_bundle),
            str(tmp_path / "m.csv"),
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-3000:])
    r = json.loads(lines[-1][len("RESULT ") :])
    assert r["loopback"] == ["127.0.0.1"]
    assert r["actor_nodes"] == r["worker_node_ids"], "the actors did not land on both workers"
    assert r["parts_before_removal"] < 40, "the node was removed after the job had finished"
    assert r["finished"] and r["rows"] == r["distinct"] == r["ok"] == len(rows)
