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
