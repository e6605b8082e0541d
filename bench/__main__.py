"""Run benchmarks: `python -m bench [NAME ...]` (default: all). Results: bench/results/*.json."""

import importlib
import sys
import time

BENCHMARKS = (
    "decoding",
    "training",
    "encoders",
    "study",
    "caption",
    "caption_scale",
    "caption_remote",
    "train_quality",
    "compress",
    "int8_decoder",
    "label_smoothing",
    "shrink_tuning",
    "int8_kernels",
    "quantizers",
    "mixed_precision",
    "choose",
    "plan",
    "flickr8k_scale",
    "feature_rate",
)


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(
            f"unknown benchmark {unknown[0]!r}; allowed: {', '.join(BENCHMARKS)}", file=sys.stderr
        )
        return 2
    for name in names:
        start = time.perf_counter()
        print(f"== bench {name}", flush=True)
        importlib.import_module(f"bench.{name}").run()
        print(f"== bench {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
