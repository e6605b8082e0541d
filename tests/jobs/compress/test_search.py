"""The goal search on a real local Ray: waves of real trials, OUT/best/ and OUT/choice.md; a
goal nothing meets; a cost goal whose candidates are measured by real caption jobs."""

import json

import pyarrow.parquet as pq
import pytest

from capfleet.compression.goal import Goal
from capfleet.compression.settings import TrialSettings
from capfleet.core.errors import CapfleetError
from capfleet.jobs import api
from capfleet.jobs.cli import main
from capfleet.jobs.compress.compress_config import CompressConfig
from capfleet.model.bundle import check_bundle

SETTINGS = TrialSettings(shrink_epochs=1, eval_images=8, bench_batch=8, bench_repeats=1)


@pytest.mark.slow
def test_goal_search_chooses_publishes_and_explains(local_ray, tiny_model, tmp_path, capsys):
    out = tmp_path / "search"
    cfg = CompressConfig(
        models=(str(tiny_model),),
        out=str(out),
        settings=SETTINGS,
        gallery=4,
        goal=Goal(max_delta_bleu4=1.0, max_trials=4),  # everything meets: the budget ends it
    )
    lines: list = []
    done = api.compress(cfg, log=lines.append)
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert [r["trial"] for r in rows][:3] == ["fp32:fp32", "dynamic:dynamic", "int8:int8"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert "shrink-50" in rows[3]["trial"]  # then a part halved
    fastest = min(rows, key=lambda r: r["e2e_ms"])["trial"]
    assert done.met is True and done.winner == fastest
    assert json.loads((out / "best" / "manifest.json").read_text())  # a whole bundle...
    check_bundle(out / "best")  # ...that loads
    choice = (out / "choice.md").read_text()
    assert f"**Winner: `{fastest}`**" in choice and choice.count("| yes |") == 4
    assert json.loads((out / "choice.json").read_text())["trials_run"] == 4
    assert (out / "gallery.html").is_file()
    assert any(line.startswith("search: wave post-training quantization") for line in lines)

    # the same output with a goal nothing meets: no new trial, no best/, exit 1
    spec = tmp_path / "impossible.toml"
    spec.write_text(
        f"""kind = "compress"
[compress]
models = ["{tiny_model}"]
out = "{out}"
gallery = 0
[compress.settings]
shrink_epochs = 1
eval_images = 8
bench_batch = 8
bench_repeats = 1
[compress.goal]
max_delta_bleu4 = 0.5
max_ms = 0.000001
"""
    )
    capsys.readouterr()
    assert main(["compress", str(spec)]) == 1
    printed = capsys.readouterr().out
    assert "4 of 4 trials already done" in printed
    assert "no candidate meets the goal" in printed
    assert not (out / "best").exists()
    assert "No candidate meets the goal" in (out / "choice.md").read_text()


def test_publishing_recovers_from_a_run_killed_while_publishing(tmp_path):
    from capfleet.core.artifacts import TMP_PREFIX
    from capfleet.jobs.compress.search import BEST_DIR, _publish

    bundle = tmp_path / "bundles" / "m" / "int8"
    bundle.mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    for leftover in (f"{TMP_PREFIX}{BEST_DIR}", f"{TMP_PREFIX}{BEST_DIR}-old"):
        (tmp_path / leftover).mkdir()  # killed between the renames: both are left
        (tmp_path / leftover / "encoder.tflite").write_bytes(b"old")
    (tmp_path / BEST_DIR).mkdir()
    assert _publish(tmp_path, bundle) == tmp_path / BEST_DIR
    assert [p.name for p in (tmp_path / BEST_DIR).iterdir()] == ["manifest.json"]
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))

    (tmp_path / "bundles" / "half").mkdir()  # a bundle that is not whole replaces nothing
    with pytest.raises(CapfleetError, match="not whole"):
        _publish(tmp_path, tmp_path / "bundles" / "half")
    assert [p.name for p in (tmp_path / BEST_DIR).iterdir()] == ["manifest.json"]


@pytest.mark.slow
def test_a_cost_goal_measures_each_candidate_by_a_real_caption_job(local_ray, tiny_model, tmp_path):
    out = tmp_path / "cost"
    goal = Goal(max_delta_bleu4=1.0, minimize="cost", price_per_cpu_hour=0.05, max_trials=3)
    cfg = CompressConfig(
        models=(str(tiny_model),), out=str(out), settings=SETTINGS, gallery=0, goal=goal
    )
    lines: list = []
    done = api.compress(cfg, log=lines.append)
    doc = json.loads((out / "choice.json").read_text())
    measured = [c for c in doc["candidates"] if c.get("cost_per_million") is not None]
    assert {c["trial"] for c in measured} == {"fp32:fp32", "dynamic:dynamic", "int8:int8"}
    for c in measured:  # cost = the CPU-hours a million images take at the job's rate
        assert c["job_img_s"] > 0
        cpus = json.loads((out / "costs.json").read_text())[c["trial"]]["cpus"]
        expected = 1e6 * cpus / c["job_img_s"] / 3600 * 0.05
        assert c["cost_per_million"] == pytest.approx(expected, rel=1e-3)
    cheapest = min(measured, key=lambda c: c["cost_per_million"])
    assert done.met and done.winner == cheapest["trial"]
    choice = (out / "choice.md").read_text()
    assert "job images/s" in choice and "The winner's fleet for 1,000,000 images" in choice
    assert sum("measuring its cost" in line for line in lines) == 3

    lines.clear()  # a rerun measures nothing again: the bundles are the same
    api.compress(cfg, log=lines.append)
    assert not any("measuring its cost" in line for line in lines)


def _poisoned(model_dir, out):
    """A copy of `model_dir` whose "merge" layer has one unit fixed at 1000 that the logits
    ignore: the float model captions as before, but an int8 tensor between the two layers
    steps by about 4 and erases the other units (all below 10). The two ops on either side of
    that tensor must stay out of int8."""
    import shutil

    from capfleet.model.modeldir import WEIGHTS_FILE, load_trained

    shutil.copytree(model_dir, out)
    cap, _, _, _ = load_trained(out)
    merge, logits = (cap.training_model.get_layer(n) for n in ("merge", "logits"))
    w, b = merge.get_weights()
    w[:, 0], b[0] = 0.0, 1000.0
    merge.set_weights([w, b])
    w, b = logits.get_weights()
    w[0, :] = 0.0
    logits.set_weights([w, b])
    cap.encoder.trainable = True  # saved in the order load_trained reads (save_trained's)
    cap.training_model.save_weights(str(out / WEIGHTS_FILE))
    return out


@pytest.mark.slow
def test_a_search_ships_a_mixed_bundle_where_int8_misses_and_float_is_too_big(local_ray, tmp_path):
    from capfleet.compression.mixed import precisions
    from capfleet.model import shapes
    from capfleet.model.bundle import DECODER_FILE
    from capfleet.model.train_config import TrainConfig
    from capfleet.model.training import train

    data = tmp_path / "shapes"
    shapes.generate(data, images=400, seed=7)  # enough for a model with a real BLEU-4
    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path / "trained"),
        units=64,
        embed_dim=32,
        dropout=0.0,
        learning_rate=0.005,
        pretrain_epochs=2,
        epochs=25,
        patience=0,
        threads=2,
        label_smoothing=0.0,
    )
    train(cfg, log=lambda _: None)
    model = _poisoned(tmp_path / "trained", tmp_path / "poisoned")
    out = tmp_path / "search"
    goal = Goal(max_delta_bleu4=0.08, max_size_mb=0.3, minimize="size", max_trials=5)
    settings = TrialSettings(bench_batch=8, bench_repeats=1)
    done = api.compress(
        CompressConfig(models=(str(model),), out=str(out), settings=settings, gallery=0, goal=goal),
        log=lambda _: None,
    )
    rows = {r["trial"]: r for r in pq.read_table(out / "trials.parquet").to_pylist()}
    assert rows["fp32:fp32"]["size_mb"] > 0.3  # float is too big...
    verdicts = {
        r["trial"]: r["meets"] for r in json.loads((out / "choice.json").read_text())["candidates"]
    }
    assert not verdicts["int8:int8"] and not verdicts["dynamic:dynamic"]  # ...int8 misses...
    assert done.met and done.winner.startswith("mixed-int8-")  # ...ops kept float repair it
    assert verdicts[done.winner] and list(rows)[:3] == ["fp32:fp32", "dynamic:dynamic", "int8:int8"]
    assert all(t.startswith("mixed-int8-") for t in list(rows)[3:])  # the waves after PTQ
    manifest = json.loads((out / "best" / "manifest.json").read_text())
    kept = manifest["layers"]["decoder"]["kept"]
    # both sides of the tensor: merge, and the logits (a graph output, named by its index)
    assert "merge" in {n.split("/")[0] for n in kept} and any(n.startswith("output-") for n in kept)
    shipped = {
        p["node"]: p["precision"] for p in precisions((out / "best" / DECODER_FILE).read_bytes())
    }
    assert {shipped[n] for n in kept} == {"float32"}
    choice = (out / "choice.md").read_text()
    assert "mixed precision: int8 but 1 sensitive op(s) of each part float32" in choice
    sens = [
        r for r in pq.read_table(out / "sensitivity.parquet").to_pylist() if r["part"] == "decoder"
    ]
    worst = min(sens, key=lambda r: r["rank"])
    assert worst["dev_bleu4_delta"] < -0.05  # the worst op alone costs the whole model BLEU-4
