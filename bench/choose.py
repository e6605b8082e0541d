"""The goal search against the compress benchmark's full grid, same model, same machine, same
run: the small-CNN model of jobs/examples/train_shapes.toml (3,000 shapes images, seed 0);
the grid of bench/compress.py (every trial, 1 CPU each); then `[compress.goal]
max_delta_bleu4 = 0.01, minimize = "latency"` into its own output. Recorded: the lowest
latency in the grid among the bundles that meet the goal, the search's winner and its
latency, the trials each ran and their wall seconds. CAPFLEET_BENCH_MODEL=DIR reuses a model."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import Timer, shapes_model, write_result
from bench.compress import TRIALS

MAX_DELTA = 0.01


def run() -> None:
    from capfleet.compression.goal import Goal, misses
    from capfleet.compression.records import read_trials
    from capfleet.jobs.compress.compress_config import CompressConfig
    from capfleet.jobs.compress.search import run_goal_search
    from capfleet.jobs.compress.trials import run_compress_job

    goal = Goal(max_delta_bleu4=MAX_DELTA, minimize="latency")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, _ = shapes_model(tmp)
        grid_cfg = CompressConfig(models=(str(model_dir),), out=str(tmp / "grid"), trials=TRIALS)
        with Timer() as grid_t:
            run_compress_job(grid_cfg)
        grid = read_trials(tmp / "grid")
        base = next(r for r in grid if r["trial"] == "fp32:fp32")
        meeting = [r for r in grid if not misses(goal, r, base)]
        grid_best = min(meeting, key=lambda r: r["e2e_ms"])
        search_cfg = CompressConfig(models=(str(model_dir),), out=str(tmp / "search"), goal=goal)
        with Timer() as search_t:
            job = run_goal_search(search_cfg)
        found = read_trials(tmp / "search")
        choice = (tmp / "search" / "choice.md").read_text()
    winner = next(r for r in found if r["trial"] == job["winner"]) if job["met"] else None
    keep = ("trial", "bleu4", "delta_bleu4", "cider_d", "size_mb", "e2e_ms", "status")
    same_in_grid = next((r for r in grid if winner and r["trial"] == winner["trial"]), None)
    write_result(
        "choose",
        {
            "what": __doc__,
            "goal": goal.describe(),
            "grid": {
                "trials": len(grid),
                "wall_s": round(grid_t.seconds, 1),
                "meeting_goal": [r["trial"] for r in meeting],
                "best": {k: grid_best[k] for k in keep},
                "records": [{k: r[k] for k in keep} for r in grid],
            },
            "search": {
                "trials": len(found),
                "wall_s": round(search_t.seconds, 1),
                "met": job["met"],
                "winner": winner and {k: winner[k] for k in keep},
                "winner_in_grid_e2e_ms": same_in_grid and same_in_grid["e2e_ms"],
                "records": [{k: r[k] for k in keep} for r in found],
                "choice_md": choice,
            },
            "search_ms_vs_grid_best": winner and round(winner["e2e_ms"] / grid_best["e2e_ms"], 3),
            "fewer_trials": len(found) < len(grid),
            "target": (
                "the search's winner meets max_delta_bleu4 = 0.01 with the grid's lowest "
                "latency (or lower) in fewer trials than the grid"
            ),
        },
    )
