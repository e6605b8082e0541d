"""A real Ray head (`ray start --head`, dashboard on 127.0.0.1, token authentication on), a
caption spec submitted through `capfleet submit`, followed to success, its Parquet checked."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import capfleet
from capfleet.cluster.connect import LOOPBACK_ENV
from capfleet.jobs.caption.parts import read_captions
from capfleet.jobs.cli import main
from tests.cluster.heads import free_port, started_head

TOKEN_FILE = Path.home() / ".ray" / "auth_token"


pytestmark = pytest.mark.slow  # make test-slow


@pytest.fixture()
def ray_head(tmp_path, monkeypatch):
    gcs, dash = free_port(), free_port()
    # Token authentication on, with the token this process already uses (Ray reads it once per
    # process): the user's ~/.ray/auth_token, or the one tests/conftest.py made for a machine
    # that has none (Ray turns auth on by itself only where that file exists).
    token = os.environ.get("RAY_AUTH_TOKEN") or TOKEN_FILE.read_text().strip()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    for key, value in auth.items():
        monkeypatch.setenv(key, value)
    # The head's PATH starts with a `python` that is not Ray's (as on a machine whose system
    # Python lacks capfleet's dependencies): a submitted job must not run it.
    decoy = tmp_path / "decoy-bin"
    decoy.mkdir()
    (decoy / "python").write_text("#!/bin/sh\necho 'the PATH python ran' >&2\nexit 3\n")
    (decoy / "python").chmod(0o755)
    env = {
        **os.environ,
        **LOOPBACK_ENV,
        **auth,
        "PATH": f"{decoy}{os.pathsep}{os.environ['PATH']}",
        **capfleet.TF_ENV,
    }
    address = f"http://127.0.0.1:{dash}"

    def answering() -> bool:
        from capfleet.cluster.submit import list_jobs

        try:
            list_jobs(address)
            return True
        except Exception:
            return False

    flags = [
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--num-cpus=2",
        "--include-dashboard=true",
    ]
    with started_head(tmp_path / "head.log", env, flags, answering):
        yield address


def test_submit_a_caption_spec_and_follow_it(ray_head, tiny_bundle, shapes_dir, tmp_path, capsys):
    out = tmp_path / "out"
    spec = tmp_path / "caption.toml"
    spec.write_text(
        f'kind = "caption"\n[caption]\nbundles = ["{tiny_bundle}"]\ninput = "{shapes_dir}"\n'
        f'out = "{out}"\nsplit = "test"\nbatch_size = 8\n'
    )
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert main(["submit", str(spec), "--address", ray_head, "--follow"]) == 0
    printed = capsys.readouterr().out
    job_id = printed.split(" as ", 1)[1].split()[0]
    assert "SUCCEEDED" in printed and "summary" in printed
    rows = read_captions(out).to_pylist()
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert pq.read_table(out / "summary.parquet").to_pylist()[0]["bleu4"] is not None
    assert main(["jobs", "status", job_id, "--address", ray_head]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
    assert main(["jobs", "list", "--address", ray_head]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["jobs", "status", "nope", "--address", ray_head]) == 2  # a clear error

    # token authentication is on: a client with another token is turned away
    probe = f"from ray.job_submission import JobSubmissionClient as C; C({ray_head!r}).list_jobs()"
    env = {**os.environ, "RAY_AUTH_TOKEN": "0" * 64, "HOME": str(tmp_path)}
    denied = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert denied.returncode != 0, "the Jobs API answered a client with a wrong token"
    assert "token" in denied.stderr.lower() or "401" in denied.stderr, denied.stderr[-2000:]
