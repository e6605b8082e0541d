"""Real-sized photo JPEGs for the benchmarks, made from the photos scikit-image ships: random
crops, flips, colour jitter and noise, 500x375 at JPEG quality 85 (about the size and decoding
cost of a Flickr8k photo). Deterministic per seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SOURCES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "color.png",
)
SIZE = (500, 375)  # width, height


def make_jpegs(out: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` distinct JPEGs in `out`; returns their paths."""
    import skimage
    from PIL import Image, ImageEnhance

    root = Path(skimage.__file__).parent / "data"
    photos = [Image.open(root / name).convert("RGB") for name in SOURCES]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        scale = rng.uniform(0.55, 1.0)
        cw, ch = int(w * scale), int(min(h, w * scale * 0.75))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x, y, x + cw, y + ch)).resize(SIZE, Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.75, 1.25))
        crop = ImageEnhance.Color(crop).enhance(rng.uniform(0.6, 1.4))
        arr = np.asarray(crop, np.float32) + rng.normal(0, 6, (SIZE[1], SIZE[0], 3))
        path = out / f"photo{i:05d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=85)
        paths.append(path)
    return paths
