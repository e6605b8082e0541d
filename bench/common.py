"""Shared helpers for the benchmarks: where results go and what machine made them."""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from capfleet.core.artifacts import cpu_info
from capfleet.model.bundle import package_versions

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES_SPEC = Path(__file__).resolve().parents[1] / "jobs" / "examples" / "train_shapes.toml"


def machine() -> dict:
    return {
        **cpu_info(),
        "platform": platform.platform(),
        "versions": package_versions("tensorflow", "tf-keras", "ai-edge-litert", "ray"),
    }


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {
        "benchmark": name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **result,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    return path


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def shapes_model(tmp: Path) -> tuple[Path, dict]:
    """The small-CNN model that jobs/examples/train_shapes.toml trains on 3,000 shapes images
    (seed 0), in tmp/small_cnn, and its manifest. CAPFLEET_BENCH_MODEL=DIR reuses a model that
    spec made instead of training one (2-4 minutes here)."""
    import dataclasses
    import shutil

    from capfleet.jobs.specs import load_spec
    from capfleet.model import shapes
    from capfleet.model.training import train

    model_dir = tmp / "small_cnn"
    if os.environ.get("CAPFLEET_BENCH_MODEL"):
        shutil.copytree(os.environ["CAPFLEET_BENCH_MODEL"], model_dir)
        return model_dir, json.loads((model_dir / "manifest.json").read_text())
    shapes.generate(tmp / "data", images=3000, seed=0)
    cfg = dataclasses.replace(load_spec(SHAPES_SPEC), data=str(tmp / "data"), out=str(model_dir))
    return model_dir, train(cfg, log=lambda _: None)
