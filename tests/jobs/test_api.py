"""The public Python API on a real local Ray: the same configs as the specs, results that hold
the output paths and tables, and user errors as CapfleetError (never SystemExit)."""

import pytest

import capfleet


def test_caption_from_fields_returns_paths_and_tables(local_ray, tiny_bundle, shapes_dir, tmp_path):
    done = capfleet.caption(
        bundles=[str(tiny_bundle)],
        input=str(shapes_dir),
        split="test",
        out=str(tmp_path / "out"),
        log=lambda _: None,
    )
    assert isinstance(done, capfleet.CaptionResult)
    assert done.captions == tmp_path / "out" / "captions" and done.captions.is_dir()
    [row] = done.summary.to_pylist()
    assert row["model"] == "tiny-fp32" and row["images"] == 8 and row["bleu1"] is not None
    assert len(done.rows()) == 8 and done.job["images"] == 8


def test_run_takes_a_spec_path_or_the_config_it_loads(local_ray, tiny_bundle, shapes_dir, tmp_path):
    spec = tmp_path / "caption.toml"
    spec.write_text(
        'kind = "caption"\n[caption]\n'
        f'bundles = ["{tiny_bundle}"]\ninput = "{shapes_dir}"\nout = "{tmp_path / "o"}"\n'
    )
    by_path = capfleet.run(spec, log=lambda _: None)
    cfg = capfleet.load_spec(spec)
    assert isinstance(cfg, capfleet.CaptionConfig)
    by_config = capfleet.run(cfg, log=lambda _: None)  # a rerun: nothing left to do
    assert by_path.summary["images"] == by_config.summary["images"]
    assert by_config.job["shards"]["run"] == 0


def test_compress_returns_the_trials_table(local_ray, tiny_model, tmp_path):
    res = capfleet.compress(
        models=[str(tiny_model)], out=str(tmp_path / "c"), trials=["fp32"], log=lambda _: None
    )
    assert isinstance(res, capfleet.CompressResult)
    assert (res.ok, res.failed) == (1, 0) and res.report.is_file()
    assert res.trials.column("trial").to_pylist() == ["fp32:fp32"]


def test_user_errors_are_capfleet_errors_not_exits(tmp_path):
    with pytest.raises(capfleet.CapfleetError, match="bundles: give at least one"):
        capfleet.caption(bundles=[], input="x", out=str(tmp_path))
    with pytest.raises(capfleet.CapfleetError, match="cannot read spec"):
        capfleet.run(tmp_path / "missing.toml")
    with pytest.raises(capfleet.CapfleetError, match="not both"):
        capfleet.train(capfleet.TrainConfig(data="d", out="o"), epochs=2)
    with pytest.raises(capfleet.CapfleetError, match="encoder"):
        capfleet.train(data="d", out="o", encoder="alexnet")
