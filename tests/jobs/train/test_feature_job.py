"""The feature job on a real local Ray, where its backbone's flatbuffer cannot be used: a cached
one that is no longer a backbone is converted again; one that cannot be made is a clear error."""

import numpy as np
import pytest

from capfleet.core.errors import CapfleetError


@pytest.fixture(scope="module")
def few_shapes(tmp_path_factory):
    from capfleet.model import shapes

    path = tmp_path_factory.mktemp("few") / "data"
    shapes.generate(path, images=30, seed=4)
    return path


@pytest.mark.slow
def test_a_cached_backbone_that_is_no_backbone_is_converted_again(local_ray, few_shapes, tmp_path):
    from capfleet.jobs.train.feature_job import compute_features
    from capfleet.model.data import SPLITS, read_split
    from capfleet.model.features import backbone_file, backbone_problem, cache_file
    from capfleet.model.train_config import TrainConfig

    cfg = TrainConfig(data=str(few_shapes), out=str(tmp_path / "m"), encoder="mobilenet_v2")
    flat = backbone_file(cfg.feature_cache, "mobilenet_v2", cfg.weights_id)
    flat.parent.mkdir(parents=True)
    flat.write_bytes(b"half a file, say, or another program's")
    lines = []
    report = compute_features(cfg, log=lines.append)
    assert any(f"{flat.name} is no mobilenet_v2 backbone" in line for line in lines), lines
    assert report["convert_seconds"] > 0 and backbone_problem(flat, "mobilenet_v2") is None
    for split in SPLITS:
        records = read_split(str(few_shapes), split)
        feats = np.load(cache_file(cfg.feature_cache, "mobilenet_v2", cfg.weights_id, records))
        assert feats.shape == (len(records), 1280) and np.isfinite(feats).all()


def test_a_backbone_that_cannot_be_converted_is_an_error_naming_it(local_ray, few_shapes, tmp_path):
    from capfleet.jobs.train.feature_job import compute_features
    from capfleet.model.features import backbone_file
    from capfleet.model.train_config import TrainConfig

    weights = tmp_path / "weights.h5"
    weights.write_bytes(b"no HDF5 in here")
    cfg = TrainConfig(
        data=str(few_shapes), out=str(tmp_path / "m"), encoder="mobilenet_v2", weights=str(weights)
    )
    with pytest.raises(CapfleetError, match="features: converting mobilenet_v2 to LiteRT failed"):
        compute_features(cfg, log=lambda _: None)
    assert not backbone_file(cfg.feature_cache, "mobilenet_v2", cfg.weights_id).exists()
