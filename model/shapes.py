"""The embedded "shapes" data set: a deterministic captioning task written in the Flickr8k layout.

Each image holds 1 to 3 distinct objects (size, colour, shape) on a tinted, noisy background,
slightly rotated and jittered. Five reference captions per image come from different phrasings
that name every object and, for two or three objects, how they are placed. A JSON Lines sidecar
records each image's true objects so that captions can be scored for content, not only BLEU.
Same seed -> byte-identical files.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from capfleet.core.errors import CapfleetError
from capfleet.core.storage import place
from capfleet.model.data import FLICKR_IMAGES_DIRS, FLICKR_SPLIT_FILES, FLICKR_TOKEN_FILE

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {  # name -> RGB; saturated so that they stand out on every background
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 70, 220),
    "yellow": (240, 205, 30),
    "purple": (145, 55, 185),
}
BACKGROUNDS = {"white": (232, 232, 228), "gray": (125, 125, 130), "black": (28, 28, 32)}
SIZES = {"small": (0.075, 0.09), "large": (0.12, 0.14)}  # half-extent as a share of the side
GRID = 3  # objects sit in the cells of a GRID x GRID layout
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
OBJECT_COUNT_WEIGHTS = (0.35, 0.35, 0.30)  # share of images with 1, 2, 3 objects
SIDECAR = "shapes_objects.jsonl"
IMAGE_SIDE = 128  # written JPEG side in pixels
SUPERSAMPLE = 3  # draw at 3x and downsample: smooth edges like a photo, not a bitmap
JPEG_QUALITY = 90
SPLIT_SHARES = (0.8, 0.1, 0.1)  # train, dev, test


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its words and where it is (centre in [0, 1] image coordinates)."""

    size: str
    colour: str
    shape: str
    x: float
    y: float

    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class ShapesImage:
    image_id: str
    background: str
    objects: tuple[ShapeObject, ...]  # in caption order: left to right (or top to bottom)
    relation: str  # "", "left", "above": how two objects are placed; "" for one or three


def _sample_scene(rng: np.random.Generator) -> tuple[str, list[ShapeObject], str]:
    """Objects sit in the cells of a 3x3 grid, jittered inside their cell. Two objects share a
    row (one left of the other) or a column (one above the other); three take three columns.
    So "left to right" is always clear, as a person describing the picture would see it."""
    n = int(rng.choice([1, 2, 3], p=OBJECT_COUNT_WEIGHTS))
    background = str(rng.choice(list(BACKGROUNDS)))
    relation = ""
    if n == 1:
        cells = [(int(rng.integers(GRID)), int(rng.integers(GRID)))]
    elif n == 2 and rng.random() < 0.5:
        relation, row = "left", int(rng.integers(GRID))
        cells = [(int(col), row) for col in sorted(rng.choice(GRID, 2, replace=False))]
    elif n == 2:
        relation, col = "above", int(rng.integers(GRID))
        cells = [(col, int(row)) for row in sorted(rng.choice(GRID, 2, replace=False))]
    else:
        cells = [(col, int(rng.integers(GRID))) for col in range(GRID)]
    kinds: set[tuple[str, str, str]] = set()
    while len(kinds) < n:  # distinct objects, so that every caption names each one apart
        kinds.add(
            (str(rng.choice(list(SIZES))), str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
        )
    ordered = sorted(kinds)  # a set's order varies between runs; sort, then shuffle by seed
    objs = []
    for i, (col, row) in zip(rng.permutation(n), cells, strict=True):
        size, colour, shape = ordered[i]
        slack = 0.5 / GRID - SIZES[size][1] - 0.01  # stay inside the cell
        x, y = ((k + 0.5) / GRID + float(rng.uniform(-slack, slack)) for k in (col, row))
        objs.append(ShapeObject(size, colour, shape, x, y))
    return background, objs, relation


def _draw(scene: ShapesImage, rng: np.random.Generator) -> Image.Image:
    side = IMAGE_SIDE * SUPERSAMPLE
    tint = rng.integers(-14, 15, size=3)
    bg = tuple(
        int(np.clip(c + t, 0, 255))
        for c, t in zip(BACKGROUNDS[scene.background], tint, strict=True)
    )
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        lo, hi = SIZES[obj.size]
        r = float(rng.uniform(lo, hi)) * side
        cx, cy = obj.x * side, obj.y * side
        jitter = rng.integers(-12, 13, size=3)
        colour = tuple(
            int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[obj.colour], jitter, strict=True)
        )
        angle = float(rng.uniform(-15, 15))
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r, angle), fill=colour)
    img = img.resize((IMAGE_SIDE, IMAGE_SIDE), Image.LANCZOS)
    noise = rng.normal(0.0, 6.0, size=(IMAGE_SIDE, IMAGE_SIDE, 3))
    arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _polygon(shape: str, cx: float, cy: float, r: float, angle_deg: float) -> list[tuple]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        scale = r * 0.9
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.radians([-90, 30, 150])]
        pts = [(x, y + 0.15) for x, y in pts]  # centre the triangle's mass
        scale = r * 1.15
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        scale = r * 1.1
    else:
        raise ValueError(f"unknown shape {shape!r}")
    t = math.radians(angle_deg)
    ct, st = math.cos(t), math.sin(t)
    return [(cx + scale * (x * ct - y * st), cy + scale * (x * st + y * ct)) for x, y in pts]


def captions_for(scene: ShapesImage) -> list[str]:
    """Five reference captions, each a different phrasing naming every object."""
    objs = scene.objects
    p = [o.phrase() for o in objs]
    bg = scene.background
    if len(objs) == 1:
        return [
            f"a {p[0]}",
            f"a {p[0]} on a {bg} background",
            f"one {p[0]}",
            f"there is a {p[0]} in the picture",
            f"a picture of a {p[0]}",
        ]
    if len(objs) == 2:
        first, second = (
            ("to the left of", "to the right of")
            if scene.relation == "left"
            else ("above", "below")
        )
        return [
            f"a {p[0]} {first} a {p[1]}",
            f"a {p[1]} {second} a {p[0]}",
            f"two shapes : a {p[0]} and a {p[1]}",
            f"a {p[0]} and a {p[1]} on a {bg} background",
            f"a picture of a {p[0]} {first} a {p[1]}",
        ]
    return [
        f"a {p[0]} , a {p[1]} and a {p[2]}",
        f"three shapes : a {p[0]} , a {p[1]} and a {p[2]}",
        f"from left to right a {p[0]} , a {p[1]} and a {p[2]}",
        f"a {p[0]} , a {p[1]} and a {p[2]} on a {bg} background",
        f"a picture of a {p[0]} , a {p[1]} and a {p[2]}",
    ]


def generate(out: str | Path, images: int = 3000, seed: int = 0) -> dict:
    """Write the data set in the Flickr8k layout under `out`; returns counts per split.

    Image i is drawn from its own generator seeded by (seed, i), so that any image can be
    reproduced alone and the output is byte-identical for the same seed.
    """
    if images < 3:
        raise CapfleetError(f"images must be >= 3 (one per split), got {images}")
    root = Path(out)
    img_dir = root / FLICKR_IMAGES_DIRS[0]
    img_dir.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(images)))
    token_lines, sidecar_lines, names = [], [], []
    for i in range(images):
        rng = np.random.default_rng([seed, i])
        background, objs, relation = _sample_scene(rng)
        scene = ShapesImage(f"shapes_{i:0{width}d}", background, tuple(objs), relation)
        name = f"{scene.image_id}.jpg"
        _draw(scene, rng).save(img_dir / name, format="JPEG", quality=JPEG_QUALITY)
        names.append(name)
        token_lines += [f"{name}#{k}\t{c}" for k, c in enumerate(captions_for(scene))]
        sidecar_lines.append(
            json.dumps(
                {
                    "image_id": scene.image_id,
                    "background": scene.background,
                    "relation": scene.relation,
                    "objects": [asdict(o) for o in scene.objects],
                }
            )
        )
    n_dev = max(1, int(images * SPLIT_SHARES[1]))
    n_test = max(1, images - int(images * SPLIT_SHARES[0]) - n_dev)
    n_train = images - n_dev - n_test
    splits = {
        "train": names[:n_train],
        "dev": names[n_train : n_train + n_dev],
        "test": names[n_train + n_dev :],
    }
    (root / FLICKR_TOKEN_FILE).write_text("\n".join(token_lines) + "\n", encoding="utf-8")
    for split, split_names in splits.items():
        text = "\n".join(split_names) + "\n"
        (root / FLICKR_SPLIT_FILES[split]).write_text(text, encoding="utf-8")
    (root / SIDECAR).write_text("\n".join(sidecar_lines) + "\n", encoding="utf-8")
    return {split: len(v) for split, v in splits.items()}


def load_objects(root: str | Path) -> dict[str, ShapesImage]:
    """Read the sidecar back: image id -> its true scene."""
    out = {}
    for line in (place(root) / SIDECAR).read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        objs = tuple(ShapeObject(**o) for o in d["objects"])
        out[d["image_id"]] = ShapesImage(d["image_id"], d["background"], objs, d["relation"])
    return out


def cell_targets(scenes: list[ShapesImage]) -> np.ndarray:
    """Per-cell labels of the GRID x GRID layout, for pretraining an encoder: (N, GRID, GRID,
    17) float32, in each cell one-hot groups for size (none, small, large), colour (none + 5),
    shape (none + 4) and the image's background (3)."""
    sizes, colours, backgrounds = list(SIZES), list(COLOURS), list(BACKGROUNDS)
    groups = (1 + len(sizes), 1 + len(colours), 1 + len(SHAPES), len(backgrounds))
    offsets = np.cumsum((0, *groups[:-1]))
    out = np.zeros((len(scenes), GRID, GRID, sum(groups)), np.float32)
    out[..., offsets[0]] = out[..., offsets[1]] = out[..., offsets[2]] = 1.0  # empty cells
    for i, scene in enumerate(scenes):
        out[i, :, :, offsets[3] + backgrounds.index(scene.background)] = 1.0
        for o in scene.objects:
            row, col = min(int(o.y * GRID), GRID - 1), min(int(o.x * GRID), GRID - 1)
            cell = out[i, row, col]
            cell[offsets[0] : offsets[3]] = 0.0
            cell[offsets[0] + 1 + sizes.index(o.size)] = 1.0
            cell[offsets[1] + 1 + colours.index(o.colour)] = 1.0
            cell[offsets[2] + 1 + SHAPES.index(o.shape)] = 1.0
    return out


CELL_GROUPS = {"size": (0, 3), "colour": (3, 9), "shape": (9, 14), "background": (14, 17)}


def content_correct(caption: str, scene: ShapesImage) -> bool:
    """True when a (cleaned) caption names exactly the scene's objects, each with its size,
    colour and shape, and any count word it uses matches the number of objects."""
    words = caption.split()
    for n, word in COUNT_WORDS.items():
        if word in words and n != len(scene.objects):
            return False
    mentions = []
    for i, w in enumerate(words):
        if w in SHAPES:
            size = words[i - 2] if i >= 2 and words[i - 2] in SIZES else None
            colour = words[i - 1] if i >= 1 and words[i - 1] in COLOURS else None
            mentions.append((size, colour, w))
    truth = sorted((o.size, o.colour, o.shape) for o in scene.objects)
    return sorted(mentions, key=str) == sorted(truth, key=str)


def content_accuracy(captions: dict[str, str], scenes: dict[str, ShapesImage]) -> float:
    """Share of captioned images whose caption is `content_correct`."""
    if not captions:
        raise ValueError("no captions to score")
    missing = [i for i in captions if i not in scenes]
    if missing:
        raise ValueError(f"{len(missing)} captioned ids not in the sidecar, e.g. {missing[0]!r}")
    return sum(content_correct(c, scenes[i]) for i, c in captions.items()) / len(captions)
