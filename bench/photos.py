"""Real-sized photo JPEGs for the benchmarks (capfleet.model.rehearsal's photos: random crops,
flips, colour jitter and noise of scikit-image's sample photos, 500x375 at JPEG quality 85,
about the size and decoding cost of a Flickr8k photo). Deterministic per seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_jpegs(out: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` distinct JPEGs in `out`; returns their paths."""
    from capfleet.model.rehearsal import photo, source_photos

    photos = source_photos()
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = out / f"photo{i:05d}.jpg"
        photo(photos, i, rng).save(path, "JPEG", quality=85)
        paths.append(path)
    return paths
