"""`capfleet plan` on a real local Ray: one real calibration job, the estimate per cluster size
with its range, and a sample too small refused before anything runs."""

import json
import os
import shutil

import pytest

from capfleet.core.errors import CapfleetError
from capfleet.jobs import api
from capfleet.jobs.cli import main


def test_plan_calibrates_on_one_run_and_estimates_per_cluster_size_with_a_range(
    local_ray, tiny_bundle, shapes_dir, tmp_path, capsys
):
    photos = tmp_path / "photos"
    photos.mkdir()
    images = sorted(shapes_dir.rglob("*.jpg"))
    for n in range(160):
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
    cpus = os.cpu_count()
    # too few images for every worker to caption several shards: refused before anything runs
    with pytest.raises(CapfleetError, match="--sample is 16"):
        api.plan(spec, images=1000, sample=16)
    assert not list(tmp_path.glob(".capfleet-plan-*")) and not (tmp_path / "job").exists()

    done = api.plan(spec, images=20_000, cpus=[8, 64], price_per_cpu_hour=0.05, sample=32 * cpus)
    cal = done.calibration
    assert cal.images == 32 * cpus and cal.shard_size == 8 and cal.workers >= 1
    lo, hi = cal.rate_range
    assert 0 < lo <= cal.rate <= hi and cal.fixed_s >= 0
    assert cal.fixed_s == pytest.approx(max(0.0, cal.wall_s - cal.images / cal.rate), abs=0.01)
    by = {r["cpus"]: r for r in done.table}
    assert set(by) == {cal.cpus, 8.0, 64.0}
    assert by[64.0]["wall_s"] < by[8.0]["wall_s"]  # more CPUs, less time, same fixed start
    assert by[8.0]["wall_s"] == round(cal.fixed_s + 20_000 / (cal.rate * 8 / cal.cpus), 1)
    low, high = by[8.0]["wall_range_s"]
    assert low <= by[8.0]["wall_s"] <= high
    assert by[8.0]["cost"] == round(by[8.0]["wall_s"] * 8 / 3600 * 0.05, 2)
    assert "Assumes:" in done.text and "| 64 |" in done.text and "range (95%)" in done.text
    assert json.loads(done.json)["plan"][0]["wall_range_s"]
    assert not list(tmp_path.glob(".capfleet-plan-*"))  # the calibration run is cleaned up
    assert main(["plan", str(spec), "--images", "10", "--cpus", "a,b"]) == 2
    assert "--cpus" in capsys.readouterr().err


def test_the_steady_cost_is_read_from_each_workers_gaps_between_shard_ends():
    from capfleet.jobs.caption.planner import steady_cost

    # two workers, each 10 images a shard: one takes 1 s a shard, the other 2 s
    ends = {"a": [(t, 10) for t in (5.0, 6.0, 7.0, 8.0)], "b": [(t, 10) for t in (5.0, 7.0, 9.0)]}
    workers, per_image, spread = steady_cost(ends)
    assert workers == 2
    assert per_image == pytest.approx((3 + 4) / 50)  # 7 s over 5 gaps of 10 images
    assert spread > 0
    with pytest.raises(CapfleetError, match="larger --sample"):
        steady_cost({"a": [(1.0, 10)], "b": [(2.0, 10)]})
