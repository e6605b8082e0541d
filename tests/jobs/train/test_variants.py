"""Training variants of a [grid] spec as tasks on a real local Ray."""

import pyarrow.parquet as pq
import pytest

from capfleet.jobs.specs import load_spec


@pytest.mark.slow
def test_grid_trains_every_variant_and_shares_features(local_ray, shapes_dir, tmp_path):
    from capfleet.jobs.train.variants import run_train_job

    spec = tmp_path / "grid.toml"
    spec.write_text(
        f"""kind = "train"
[train]
data = "{shapes_dir}"
out = "{tmp_path / "train"}"
units = 16
embed_dim = 8
epochs = 2
patience = 0
threads = 1
[grid]
encoder = ["small_cnn", "mobilenet_v2"]
"""
    )
    grid = load_spec(spec)
    assert grid.names == ("encoder=small_cnn", "encoder=mobilenet_v2")
    lines = []
    table = run_train_job(grid, log=lines.append)
    rows = pq.read_table(tmp_path / "train" / "variants.parquet").to_pylist()
    assert rows == table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["error"] for r in rows]
    for r in rows:
        assert 0.0 <= r["bleu4"] <= r["bleu1"] <= 1.0 and r["epochs_run"] == 2
        assert r["cider_d"] >= 0.0 and 0.0 <= r["rouge_l"] <= 1.0
        assert (tmp_path / "train" / r["variant"] / "manifest.json").is_file()
    # mobilenet's features were computed once, before its variant started, then only read
    cache = sorted((tmp_path / "train" / "feature_cache").glob("*.npy"))
    assert len(cache) == 3  # train, dev and test
    mobile = next(r for r in rows if r["encoder"] == "mobilenet_v2")
    assert all(p.stat().st_mtime < mobile["started"] for p in cache)
    assert any("computing features of 1 frozen backbone" in line for line in lines)
    assert sum(line.startswith("[") for line in lines) == 2

    lines.clear()  # a rerun keeps what the same spec already trained
    again = run_train_job(grid, log=lines.append).to_pylist()
    assert sum("already trained" in line for line in lines) == 2
    assert [r["bleu4"] for r in again] == [r["bleu4"] for r in rows]


def test_a_variant_trained_on_data_since_rewritten_is_trained_again(
    tiny_model, shapes_dir, tmp_path
):
    import json
    import shutil

    from capfleet.jobs.train.variants import _trained
    from capfleet.model.data import data_identity
    from capfleet.model.train_config import TrainConfig

    data, model = tmp_path / "data", tmp_path / "tiny"
    shutil.copytree(shapes_dir, data)
    shutil.copytree(tiny_model, model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["train"].update(data=str(data), out=str(model))
    manifest["data_identity"] = data_identity(str(data))
    (model / "manifest.json").write_text(json.dumps(manifest))
    cfg = TrainConfig(**manifest["train"])
    assert _trained(cfg) is not None  # same spec, same data: kept
    tokens = data / "Flickr8k.token.txt"  # same folder name, other captions
    tokens.write_text(tokens.read_text().replace("small", "tiny", 3))
    assert _trained(cfg) is None
