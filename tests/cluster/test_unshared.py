"""A driver that shares no disk with the cluster's workers: the driver runs in its own mount
namespace with a private tmpfs over one folder, the workers of a `ray start --head` node run
outside it. A bundle only the driver holds still captions on the workers (shipped through
Ray's object store, checked by sha256); a local output only the driver sees fails loudly,
naming the cause; an output in an object store (moto's S3 server) completes; a frozen
backbone trains from a data set in the store into the store, its feature cache there."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import capfleet
from capfleet.cluster.connect import LOOPBACK_ENV
from capfleet.core.storage import MIRROR_DIR
from tests.cluster.heads import free_port, started_head

HERE = Path(__file__).parent
TOKEN_FILE = Path.home() / ".ray" / "auth_token"


def _env() -> dict:
    """The head's and the driver's: loopback, Keras 2, and one token (the session's)."""
    token = os.environ.get("RAY_AUTH_TOKEN") or TOKEN_FILE.read_text().strip()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    return {**os.environ, **LOOPBACK_ENV, **capfleet.TF_ENV, **auth}


pytestmark = pytest.mark.slow  # make test-slow


def _can_unshare() -> bool:
    unshare = shutil.which("unshare")
    if not unshare:
        return False
    done = subprocess.run(
        [unshare, "-rm", "--propagation", "private", "true"], capture_output=True, check=False
    )
    return done.returncode == 0


@pytest.fixture()
def head(tmp_path):
    """A one-node Ray cluster on loopback."""
    gcs, log = free_port(), tmp_path / "head.log"
    flags = [
        f"--port={gcs}",
        "--num-cpus=2",
        "--include-dashboard=false",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
    ]
    started = lambda: "Ray runtime started" in log.read_text(errors="replace")  # noqa: E731
    with started_head(log, _env(), flags, started):
        yield f"127.0.0.1:{gcs}"


@pytest.mark.skipif(not _can_unshare(), reason="needs user and mount namespaces (unshare -rm)")
def test_a_driver_that_shares_no_disk_with_its_workers(head, tiny_bundle, shapes_dir, s3, tmp_path):
    private = tmp_path / "driver-only"
    private.mkdir()
    data_name = f"shapes-{s3.bucket}"  # the data set's name in the store: this test's alone
    script = (
        f'mount -t tmpfs tmpfs "{private}" && exec "{sys.executable}" '
        f'"{HERE / "unshared_driver.py"}" "$@"'
    )
    done = subprocess.run(
        ["unshare", "-rm", "--propagation", "private", "sh", "-c", script, "driver"]
        + [head, str(tiny_bundle), str(shapes_dir), str(private), s3.uri("out")]
        + [s3.upload(shapes_dir, f"data/{data_name}")],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    # the bundle only the driver held captioned every image on the workers, into S3
    assert result["s3"]["rows"] == {"tiny-fp32": 24} or list(result["s3"]["rows"].values()) == [24]
    assert result["s3"]["shards"]["failed"] == 0
    parts = [k for k in s3.keys("out") if "/part-" in k]
    assert len(parts) == result["s3"]["shards"]["total"] == 3
    # ...and it never was on the workers' side of the disk
    assert not (private / "bundle").exists()

    # a local output only the driver sees: refused once the workers ran, naming the cause
    error = result["local"]["error"]
    assert error and "not shared by every node" in error, error
    # the workers did write their parts, where the driver could not see them
    assert len(list((private / "out" / "captions").rglob("part-*.parquet"))) == 3

    # a frozen backbone trained from the store into the store: its features computed by the
    # workers into the store's feature cache, and read back there by the variant's task
    assert result["train"]["status"] == ["ok"], result["train"]["error"]
    cache = [k for k in s3.keys("train/feature_cache") if "/" not in k]
    assert sum(k.endswith(".npy") for k in cache) == 3 and any(k.endswith(".tflite") for k in cache)
    assert "base/manifest.json" in s3.keys("train")
    # ...and the variant copied none of the data set to its node: it read the text and the
    # listing from the store and every image's features from the cache
    mirrors = Path(tempfile.gettempdir()) / MIRROR_DIR
    assert not list(mirrors.glob(f"*/{data_name}")), "the data set was copied to a node"
