"""The caption job's default sizing against hand-tuned ones, on this machine: `capfleet
caption` with default flags (an autoscaling pool of 1-CPU actors, decoding fused into them)
beside pinned pools of 1, 2 and 4 actors of 0.5 to 2 CPUs, each run on the same manifest of
real-sized photo JPEGs (bench/photos.py), with the per-core limit (bench/caption_scale.py) for
scale. Small-CNN fp32 bundle with the shapes data set's decoder, random weights (every caption
runs to full length). images_per_s counts the whole job, start-up included; steady_images_per_s
is this model's own rate from the first part begun to the last finished."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bench.caption_scale import caption_cli, per_core_limit, small_cnn_job, summary_row
from bench.common import write_result

ROWS = int(os.environ.get("CAPFLEET_BENCH_CAPTION_ROWS", 20_000))
DISTINCT = 2000
# (actors, CPUs per actor); None = the default flags
SIZINGS = [None, (1, 1.0), (2, 1.0), (2, 0.5), (4, 0.5), (1, 2.0)]


def run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos, bundle, manifest = small_cnn_job(tmp, ROWS, DISTINCT)
        limit = per_core_limit(bundle, photos)
        print("per-core limit", limit, flush=True)
        runs = []
        for n, sizing in enumerate(SIZINGS):
            flags = [] if sizing is None else ["--actors", str(sizing[0])]
            if sizing is not None:
                flags += ["--actor-cpus", str(sizing[1]), "--decode-cpus", str(sizing[1])]
            out = tmp / f"out-{n}"
            done = caption_cli(bundle, manifest, out, *flags)
            s = summary_row(out)
            runs.append(
                {
                    "sizing": "default" if sizing is None else f"{sizing[0]} x {sizing[1]:g} CPU",
                    "flags": flags,
                    "wall_s": done["wall_s"],
                    "images_per_s": round(ROWS / done["wall_s"], 1),
                    "steady_images_per_s": s["throughput_img_s"]
                    and round(s["throughput_img_s"], 1),
                    "ray_start_s": done["job"]["ray_start_seconds"],
                    "actor_peak_rss_mb": done["actor_peak_rss_mb"],
                }
            )
            print(runs[-1], flush=True)
        limit_after = per_core_limit(bundle, photos)
    default, tuned = runs[0], runs[1:]
    best = max(tuned, key=lambda r: r["images_per_s"])
    write_result(
        "caption",
        {
            "what": __doc__,
            "rows": ROWS,
            "distinct_photos": DISTINCT,
            "per_core_limit": limit,
            "per_core_limit_after": limit_after,
            "runs": runs,
            "default_vs_best_hand_tuned": round(default["images_per_s"] / best["images_per_s"], 3),
            "best_hand_tuned": best["sizing"],
            "default_vs_limit": round(default["images_per_s"] / limit["sum"], 3),
            "target": "default flags within 10% of the best hand-tuned sizing",
        },
    )
