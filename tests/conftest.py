"""Shared fixtures: tiny generated data and a tiny trained model, no network."""

import os
import secrets
from pathlib import Path

import pytest

import model  # noqa: F401  (TF_USE_LEGACY_KERAS before any test imports TensorFlow)

# One Ray token for the whole test session, before anything imports Ray: the user's
# ~/.ray/auth_token where it exists, else one made here (not written to the home folder).
if not os.environ.get("RAY_AUTH_TOKEN") and not (Path.home() / ".ray" / "auth_token").is_file():
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes data set in the Flickr8k layout (80 images: 64 train, 8 dev, 8 test)."""
    from model import shapes

    root = tmp_path_factory.mktemp("shapes")
    shapes.generate(root, images=80, seed=7)
    return root


@pytest.fixture(scope="session")
def tiny_model(shapes_dir, tmp_path_factory):
    """A small-CNN captioner trained for a few epochs: enough to exercise every path."""
    from model.training import TrainConfig, train

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
    from compression.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-fp32"
    export_bundle(tiny_model, out)
    return out
