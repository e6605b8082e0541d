"""Shared fixtures: tiny generated data and a tiny trained model, no network."""

import os
import secrets
from pathlib import Path

import pytest

import capfleet

# One Ray token for the whole test session, before anything imports Ray: the user's
# ~/.ray/auth_token where it exists, else one made here (not written to the home folder).
if not os.environ.get("RAY_AUTH_TOKEN") and not (Path.home() / ".ray" / "auth_token").is_file():
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

# Object-store tests talk to a moto S3 server on loopback only: test credentials, no profile or
# config file of the user's, and no instance-metadata lookup (it would leave loopback). Set
# before Ray starts, so that its workers have them too.
os.environ.update(
    AWS_ACCESS_KEY_ID="capfleet-test",
    AWS_SECRET_ACCESS_KEY="capfleet-test",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
    AWS_CONFIG_FILE=os.devnull,
    AWS_SHARED_CREDENTIALS_FILE=os.devnull,
)
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)


class S3:
    """A bucket in the test S3 server; `uri(key)` names an object or prefix in it, with the
    server's endpoint written in the URI (as a user of an S3-compatible store would)."""

    def __init__(self, port: int, bucket: str):
        self.port, self.bucket = port, bucket
        self.options = f"endpoint_override=127.0.0.1:{port}&scheme=http"

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key.strip('/')}?{self.options}"

    @property
    def fs(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http")

    def upload(self, folder: Path, key: str) -> str:
        """Every file under `folder` to `key`/...; returns the prefix's URI."""
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                with self.fs.open_output_stream(
                    f"{self.bucket}/{key}/{p.relative_to(folder)}"
                ) as f:
                    f.write(p.read_bytes())
        return self.uri(key)

    def keys(self, key: str = "") -> list[str]:
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(f"{self.bucket}/{key}".rstrip("/"), recursive=True)
        infos = self.fs.get_file_info(sel)
        base = len(f"{self.bucket}/{key}".rstrip("/")) + 1
        return sorted(i.path[base:] for i in infos if i.type == pafs.FileType.File)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API server on 127.0.0.1 (a free port), for the whole session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server.get_host_and_port()[1]
    server.stop()


@pytest.fixture
def s3(s3_server, request):
    """A new, empty bucket for this test."""
    import pyarrow.fs as pafs

    bucket = "t-" + secrets.token_hex(6)
    fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{s3_server}", scheme="http", allow_bucket_creation=True
    )
    fs.create_dir(bucket)
    return S3(s3_server, bucket)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes data set in the Flickr8k layout (80 images: 64 train, 8 dev, 8 test)."""
    from capfleet.model import shapes

    root = tmp_path_factory.mktemp("shapes")
    shapes.generate(root, images=80, seed=7)
    return root


@pytest.fixture(scope="session")
def tiny_model(shapes_dir, tmp_path_factory):
    """A small-CNN captioner trained for a few epochs: enough to exercise every path."""
    from capfleet.model.train_config import TrainConfig
    from capfleet.model.training import train

    out = tmp_path_factory.mktemp("models") / "tiny"
    train(
        TrainConfig(
            data=str(shapes_dir),
            out=str(out),
            units=32,
            embed_dim=16,
            epochs=3,
            batch_size=16,
            patience=0,
            threads=2,
        ),
        log=lambda _: None,
    )
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model, tmp_path_factory):
    from capfleet.compression.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-fp32"
    export_bundle(tiny_model, out)
    return out


@pytest.fixture(scope="session")
def local_ray():
    from capfleet.cluster.connect import LOOPBACK_ENV, use_loopback

    use_loopback()
    import ray

    ray.init(
        address="local",  # a new instance: never whatever `ray start` left in /tmp/ray
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {**capfleet.TF_ENV, **LOOPBACK_ENV}},
        log_to_driver=False,
    )
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}, "Ray left loopback"
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def second_bundle(tiny_model, tmp_path_factory):
    from capfleet.compression.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-b"
    export_bundle(tiny_model, out)
    return out
