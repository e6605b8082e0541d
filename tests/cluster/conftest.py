"""One real local Ray instance for the cluster tests, on loopback, stopped at the end."""

import pytest


@pytest.fixture(scope="session")
def local_ray():
    from cluster.connect import LOOPBACK_ENV, use_loopback

    use_loopback()
    import ray

    ray.init(
        address="local",  # a new instance: never whatever `ray start` left in /tmp/ray
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1", **LOOPBACK_ENV}},
        log_to_driver=False,
    )
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}, "Ray left loopback"
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def second_bundle(tiny_model, tmp_path_factory):
    from compression.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-b"
    export_bundle(tiny_model, out)
    return out
