"""A whole pipeline spec, small, through `capfleet run` on the test session's local Ray: the
layouts of the commands it stands for, the study-shaped table, and a rerun that keeps it all."""

import pyarrow.parquet as pq
import pytest

from capfleet.jobs.cli import main


@pytest.mark.slow
def test_pipeline_spec_runs_every_step(local_ray, tmp_path, capsys):
    out = tmp_path / "run"
    spec = tmp_path / "p.toml"
    spec.write_text(
        f"""kind = "pipeline"
[pipeline]
out = "{out}"
[pipeline.data]
images = 60
[pipeline.train]
units = 16
embed_dim = 8
epochs = 2
patience = 0
threads = 1
[pipeline.grid]
seed = [0, 1]
[pipeline.compress]
trials = ["int8"]
[pipeline.compress.settings]
finetune_epochs = 1
bench_repeats = 1
[pipeline.caption]
trials = ["fp32", "int8"]
"""
    )
    assert main(["run", str(spec)]) == 0
    printed = capsys.readouterr().out
    variants = pq.read_table(out / "train" / "variants.parquet").to_pylist()
    assert [v["status"] for v in variants] == ["ok", "ok"]
    trials = pq.read_table(out / "compress" / "trials.parquet").to_pylist()
    assert len(trials) == 2 and {t["status"] for t in trials} == {"ok"}  # the best variant only
    assert (out / "compress" / "report.md").is_file()
    summary = pq.read_table(out / "caption" / "summary.parquet").to_pylist()
    assert len(summary) == 2 and all(s["images"] == s["ok"] == 6 for s in summary)
    assert all(s["bleu4"] is not None for s in summary)
    assert "2000 imgs (min)" in printed and "Best BLEU-4" in printed

    assert main(["run", str(spec)]) == 0  # the rerun keeps every step's output
    printed = capsys.readouterr().out
    assert "already holds 60 shapes images" in printed
    assert printed.count("already trained") == 2
    assert "2 of 2 trials already done" in printed


def test_the_variant_is_chosen_on_plain_dev_cross_entropy_at_the_kept_epoch(tmp_path):
    import json

    from capfleet.jobs.pipeline import _dev_nll

    def variant(name, history):
        (tmp_path / name).mkdir()
        manifest = {"format": "capfleet-model/1", "config": {}, "train": {}, "history": history}
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
        return {"model_dir": str(tmp_path / name)}

    # early stopping keeps epoch 1 (best dev loss), whose cross-entropy is 0.4, not the 0.3
    # of a later epoch whose weights were not kept
    smoothed = variant("a", {"val_loss": [1.0, 0.8, 0.9], "val_nll": [0.5, 0.4, 0.3]})
    assert _dev_nll(smoothed) == 0.4
    plain = variant("b", {"val_loss": [0.6, 0.45], "val_nll": [0.6, 0.45]})
    assert min([smoothed, plain], key=_dev_nll) is smoothed  # its loss is higher: smoothing
    assert _dev_nll(variant("c", {"val_loss": [0.7, 0.5]})) == 0.5  # trained before val_nll
