"""The goal search and the planner on a real local Ray: waves of real trials, OUT/best/ and
OUT/choice.md; a goal nothing meets; a plan calibrated by two real caption jobs."""

import json
import shutil

import pyarrow.parquet as pq

from capfleet.compression.goal import Goal
from capfleet.compression.settings import TrialSettings
from capfleet.jobs import api
from capfleet.jobs.cli import main
from capfleet.jobs.compress.compress_config import CompressConfig
from capfleet.model.bundle import check_bundle

SETTINGS = TrialSettings(shrink_epochs=1, eval_images=8, bench_batch=8, bench_repeats=1)


def test_goal_search_chooses_publishes_and_explains(local_ray, tiny_model, tmp_path, capsys):
    out = tmp_path / "search"
    cfg = CompressConfig(
        models=(str(tiny_model),),
        out=str(out),
        settings=SETTINGS,
        gallery=4,
        goal=Goal(max_delta_bleu4=1.0, max_trials=5),  # everything meets: the budget ends it
    )
    lines: list = []
    done = api.compress(cfg, log=lines.append)
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert [r["trial"] for r in rows][:3] == ["fp32:fp32", "dynamic:dynamic", "int8:int8"]
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)
    assert all("shrink-50" in r["trial"] for r in rows[3:])  # each part halved, side by side
    fastest = min(rows, key=lambda r: r["e2e_ms"])["trial"]
    assert done.met is True and done.winner == fastest
    assert json.loads((out / "best" / "manifest.json").read_text())  # a whole bundle...
    check_bundle(out / "best")  # ...that loads
    choice = (out / "choice.md").read_text()
    assert f"**Winner: `{fastest}`**" in choice and choice.count("| yes |") == 5
    assert json.loads((out / "choice.json").read_text())["trials_run"] == 5
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
    assert "5 of 5 trials already done" in printed
    assert "no candidate meets the goal" in printed
    assert not (out / "best").exists()
    assert "No candidate meets the goal" in (out / "choice.md").read_text()


def test_plan_calibrates_on_two_sizes_and_estimates_per_cluster_size(
    local_ray, tiny_bundle, shapes_dir, tmp_path, capsys
):
    photos = tmp_path / "photos"
    photos.mkdir()
    images = sorted(shapes_dir.rglob("*.jpg"))
    for n in range(2400):
        shutil.copy(images[n % len(images)], photos / f"img{n:04d}.jpg")
    spec = tmp_path / "caption.toml"
    spec.write_text(
        f"""kind = "caption"
[caption]
bundles = ["{tiny_bundle}"]
input = "{photos}"
out = "{tmp_path / "job"}"
"""
    )
    done = api.plan(spec, images=20_000, cpus=[8, 64], price_per_cpu_hour=0.05, sample=600)
    cal = done.calibration
    assert cal.images == (600, 2400) and cal.rate > 0 and cal.fixed_s >= 0
    by = {r["cpus"]: r for r in done.table}
    assert set(by) == {cal.cpus, 8.0, 64.0}
    assert by[64.0]["wall_s"] < by[8.0]["wall_s"]  # more CPUs, less time, same fixed start
    assert by[8.0]["wall_s"] == round(cal.fixed_s + 20_000 / (cal.rate * 8 / cal.cpus), 1)
    assert by[8.0]["cost"] == round(by[8.0]["wall_s"] * 8 / 3600 * 0.05, 2)
    assert "Assumes:" in done.text and "| 64 |" in done.text
    assert not list(tmp_path.glob(".capfleet-plan-*"))  # calibration runs are cleaned up
    assert main(["plan", str(spec), "--images", "10", "--cpus", "a,b"]) == 2
    assert "--cpus" in capsys.readouterr().err


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
