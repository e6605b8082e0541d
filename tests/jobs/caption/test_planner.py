"""`capfleet plan` on a real local Ray: real calibration jobs (a quarter of the sample, all of
it, the quarter again), the estimate per cluster size with its range, and too small an input
refused before anything runs."""

import shutil

import pytest

from capfleet.core.errors import CapfleetError
from capfleet.jobs import api
from capfleet.jobs.cli import main


def test_plan_calibrates_on_two_sizes_and_estimates_per_cluster_size(
    local_ray, tiny_bundle, shapes_dir, tmp_path, capsys
):
    photos = tmp_path / "photos"
    photos.mkdir()
    images = sorted(shapes_dir.rglob("*.jpg"))
    for n in range(640):
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
    # too few images: refused before anything runs
    few = tmp_path / "few.toml"
    few.write_text(spec.read_text().replace(str(photos), str(shapes_dir)))
    with pytest.raises(CapfleetError, match="calibrating needs at least 64"):
        api.plan(few, images=1000, sample=4096)  # the shapes test split: 8 images
    assert not list(tmp_path.glob(".capfleet-plan-*")) and not (tmp_path / "job").exists()

    done = api.plan(spec, images=20_000, cpus=[8, 64], price_per_cpu_hour=0.05, sample=640)
    cal = done.calibration
    assert cal.images == (160, 640) and cal.rate > 0 and cal.fixed_s >= 0
    lo, hi = cal.rate_range
    assert 0 < lo <= cal.rate <= hi  # hi may be unbounded: the runs moved that much
    w1, w2, again = cal.wall_s
    assert lo == pytest.approx(480 / (w2 - (w1 + again) / 2 + abs(w1 - again)), rel=0.02)
    by = {r["cpus"]: r for r in done.table}
    assert set(by) == {cal.cpus, 8.0, 64.0}
    assert by[64.0]["wall_s"] < by[8.0]["wall_s"]  # more CPUs, less time, same fixed start
    assert by[8.0]["wall_s"] == round(cal.fixed_s + 20_000 / (cal.rate * 8 / cal.cpus), 1)
    assert by[8.0]["cost"] == round(by[8.0]["wall_s"] * 8 / 3600 * 0.05, 2)
    fastest, slowest = by[8.0]["wall_range_s"]
    assert fastest <= by[8.0]["wall_s"] <= slowest
    assert "Assumes:" in done.text and "| 64 |" in done.text and "| range |" in done.text
    assert not list(tmp_path.glob(".capfleet-plan-*"))  # calibration runs are cleaned up
    assert main(["plan", str(spec), "--images", "10", "--cpus", "a,b"]) == 2
    assert "--cpus" in capsys.readouterr().err
