"""Quality: train the small-CNN captioner on the embedded shapes data set (default demo size)
under a 5-minute training budget on this machine; BLEU-1..4 and content accuracy on the test
split, and the time it took."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from bench.common import Timer, write_result

SPEC = Path(__file__).resolve().parents[1] / "jobs" / "examples" / "train_shapes.toml"


def run() -> None:
    from capfleet.jobs.specs import load_spec
    from capfleet.model import shapes

    spec = load_spec(SPEC)
    with tempfile.TemporaryDirectory() as tmp:
        with Timer() as gen:
            counts = shapes.generate(Path(tmp) / "data", images=3000, seed=0)
        cfg = dataclasses.replace(spec, data=str(Path(tmp) / "data"), out=str(Path(tmp) / "m"))
        from capfleet.model.training import train

        with Timer() as t:
            manifest = train(cfg)
    m = manifest["test_metrics"]
    write_result(
        "train_quality",
        {
            "what": __doc__,
            "data": {
                "images": 3000,
                "seed": 0,
                "splits": counts,
                "generate_seconds": round(gen.seconds, 1),
            },
            "spec": dataclasses.asdict(spec),
            "epochs_run": manifest["epochs_run"],
            "train_seconds": manifest["train_seconds"],
            "total_seconds_incl_test_eval": round(t.seconds, 1),
            "test": {
                k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items() if k != "data"
            },
            "targets": {"bleu4": 0.75, "content_accuracy": 0.80, "train_seconds": 300},
        },
    )
