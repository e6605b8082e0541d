import hashlib
import json

import numpy as np
from PIL import Image

from capfleet.model import shapes
from capfleet.model.data import Flickr8kReader
from capfleet.model.text import clean_caption


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    shapes.generate(tmp_path / "a", images=24, seed=3)
    shapes.generate(tmp_path / "b", images=24, seed=3)
    shapes.generate(tmp_path / "c", images=24, seed=4)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_flickr_reader_reads_the_generated_layout(tmp_path):
    counts = shapes.generate(tmp_path, images=50, seed=0)
    assert counts == {"train": 40, "dev": 5, "test": 5}
    for split, n in counts.items():
        recs = Flickr8kReader(tmp_path, split).records()
        assert len(recs) == n and all(len(r.captions) == 5 for r in recs)
    img = Image.open(recs[0].uri)
    assert img.format == "JPEG" and img.size == (shapes.IMAGE_SIDE, shapes.IMAGE_SIDE)


def test_variety_of_scenes_and_captions(tmp_path):
    shapes.generate(tmp_path, images=300, seed=1)
    scenes = shapes.load_objects(tmp_path)
    counts = np.bincount([len(s.objects) for s in scenes.values()], minlength=4)
    assert all(counts[1:] > 50), counts  # 1, 2 and 3 objects all common
    assert {s.background for s in scenes.values()} == set(shapes.BACKGROUNDS)
    kinds = {(o.size, o.colour, o.shape) for s in scenes.values() for o in s.objects}
    assert len(kinds) == len(shapes.SIZES) * len(shapes.COLOURS) * len(shapes.SHAPES)
    assert {s.relation for s in scenes.values()} == {"", "left", "above"}
    caps = [c for r in Flickr8kReader(tmp_path, "train").records() for c in r.captions]
    # one-object scenes have only 40 kinds and repeat; scenes of two or three almost never do
    assert len(set(caps)) > 0.75 * len(caps)
    vocab = {w for c in caps for w in clean_caption(c).split()}
    assert {"left", "right", "above", "below", "background", "two", "three"} <= vocab
    assert len(vocab) >= 30


def test_every_reference_caption_scores_content_correct(tmp_path):
    shapes.generate(tmp_path, images=60, seed=2)
    scenes = shapes.load_objects(tmp_path)
    for rec in Flickr8kReader(tmp_path, "train").records():
        for cap in rec.captions:
            assert shapes.content_correct(clean_caption(cap), scenes[rec.image_id]), cap


def test_content_scorer_catches_wrong_attributes_and_counts():
    obj = [
        shapes.ShapeObject("small", "red", "circle", 0.2, 0.5),
        shapes.ShapeObject("large", "blue", "square", 0.8, 0.5),
    ]
    scene = shapes.ShapesImage("x", "white", tuple(obj), "left")
    ok = "small red circle to the left of large blue square"
    assert shapes.content_correct(ok, scene)
    assert not shapes.content_correct(ok.replace("blue", "green"), scene)
    assert not shapes.content_correct(ok.replace("large ", ""), scene)  # size not named
    assert not shapes.content_correct("small red circle", scene)  # an object missing
    assert not shapes.content_correct("three shapes " + ok, scene)  # wrong count
    assert shapes.content_accuracy({"x": ok}, {"x": scene}) == 1.0


def test_sidecar_objects_match_pixels(tmp_path):
    shapes.generate(tmp_path, images=20, seed=5)
    for line in (tmp_path / shapes.SIDECAR).read_text().splitlines():
        d = json.loads(line)
        img = np.asarray(Image.open(tmp_path / "Flicker8k_Dataset" / f"{d['image_id']}.jpg"))
        for o in d["objects"]:
            px = img[int(o["y"] * img.shape[0]), int(o["x"] * img.shape[1])].astype(int)
            want = np.array(shapes.COLOURS[o["colour"]])
            assert np.abs(px - want).max() < 60, (d["image_id"], o, px)


def test_every_split_gets_an_image_even_for_tiny_sets(tmp_path):
    for n in (3, 4, 5, 11):
        counts = shapes.generate(tmp_path / str(n), images=n, seed=0)
        assert min(counts.values()) >= 1 and sum(counts.values()) == n, (n, counts)


def test_cell_targets_put_each_object_in_its_cell():
    from capfleet.model.shapes import CELL_GROUPS, ShapeObject, ShapesImage, cell_targets

    scene = ShapesImage(
        "x",
        "gray",
        (
            ShapeObject("small", "red", "star", 0.15, 0.5),  # left column, middle row
            ShapeObject("large", "blue", "circle", 0.85, 0.5),  # right column, middle row
        ),
        "left",
    )
    t = cell_targets([scene])[0]

    def group(cell, name):
        a, b = CELL_GROUPS[name]
        return int(cell[a:b].argmax())

    assert [group(t[1, 0], k) for k in ("size", "colour", "shape")] == [1, 1, 4]  # small red star
    assert [group(t[1, 2], k) for k in ("size", "colour", "shape")] == [
        2,
        3,
        1,
    ]  # large blue circle
    assert sum(group(t[r, c], "shape") > 0 for r in range(3) for c in range(3)) == 2
    assert all(group(t[r, c], "background") == 1 for r in range(3) for c in range(3))  # gray
    assert t.sum() == 9 * 4  # one-hot groups: four ones in every cell
