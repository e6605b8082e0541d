"""One real local Ray instance for the cluster tests, on loopback, stopped at the end."""

import os

import pytest


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from cluster.connect import LOOPBACK_ENV

    os.environ.update(LOOPBACK_ENV)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1", **LOOPBACK_ENV}},
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def second_bundle(tiny_model, tmp_path_factory):
    from compression.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-b"
    export_bundle(tiny_model, out)
    return out
