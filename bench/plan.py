"""`capfleet plan` against the job it plans, same machine, same run: a caption spec of a
20,000-row manifest of real-sized photo JPEGs (bench/photos.py) with the small-CNN fp32 bundle
of bench/caption.py, default sizing. The planner calibrates on the first 1,024 and 4,096 rows
(and the 1,024 again, for its range);
then the 20,000-row job runs as `capfleet caption` with the same (default) flags, as a
subprocess: its wall includes the interpreter's start, which the estimate leaves out.
Recorded: the estimate for this machine and its range, the measured wall, their ratio (target:
within 20%), whether the measured wall lies in the range, and the plan's table."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.caption_scale import caption_cli, small_cnn_job
from bench.common import write_result

ROWS = int(os.environ.get("CAPFLEET_BENCH_PLAN_ROWS", 20_000))
DISTINCT = 2000


def run() -> None:
    from capfleet.jobs import api

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, bundle, manifest = small_cnn_job(tmp, ROWS, DISTINCT)
        spec = tmp / "caption.toml"
        spec.write_text(  # default flags, as the job below
            f'kind = "caption"\n[caption]\nbundles = ["{bundle}"]\n'
            f'input = "{manifest}"\nout = "{tmp / "job"}"\n'
        )
        t0 = time.perf_counter()
        plan = api.plan(spec, images=ROWS, cpus=[8, 32, 128], price_per_cpu_hour=0.05)
        plan_s = time.perf_counter() - t0
        here = next(r for r in plan.table if r["cpus"] == plan.calibration.cpus)
        print(plan.text, flush=True)
        job = caption_cli(bundle, manifest, tmp / "job")  # `capfleet caption`, default flags
        measured = job["wall_s"]
    write_result(
        "plan",
        {
            "what": __doc__,
            "rows": ROWS,
            "plan_seconds": round(plan_s, 1),
            "estimate_s": here["wall_s"],
            "estimate_range_s": here["wall_range_s"],
            "in_range": here["wall_range_s"][0] <= measured <= here["wall_range_s"][1],
            "measured_s": round(measured, 1),
            "estimate_vs_measured": round(here["wall_s"] / measured, 3),
            "within_20pct": abs(here["wall_s"] / measured - 1) <= 0.20,
            "plan": plan.table,
            "plan_text": plan.text,
        },
    )
