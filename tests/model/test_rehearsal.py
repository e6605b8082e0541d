"""The Flickr8k-sized rehearsal set: Flickr8k's layout and quirks, photo-sized JPEGs,
Flickr8k-like caption statistics, deterministic per seed."""

from pathlib import Path

import numpy as np
from PIL import Image

from capfleet.model import rehearsal
from capfleet.model.data import Flickr8kReader, read_split


def test_layout_quirks_and_determinism(tmp_path):
    a = rehearsal.generate(tmp_path / "a", images=40, seed=3)
    assert (a["train"], a["dev"], a["test"], a["in_no_split"]) == (30, 4, 4, 3)
    token = tmp_path / "a" / "Flickr8k_text" / "Flickr8k.token.txt"
    raw = token.read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") == 5 * 40 + 5  # CRLF, as the real files
    train = read_split(str(tmp_path / "a"), "train")
    assert len(train) == 29 and all(len(r.captions) == 5 for r in train)  # the id with no image
    listed = Flickr8kReader(tmp_path / "a", "train").records(include_missing=True)
    missing = [r for r in listed if r.error]
    assert len(missing) == 1 and missing[0].error.startswith("missing")
    photo = Image.open(train[0].uri)
    assert photo.size == (500, 375) and photo.format == "JPEG"
    assert 20_000 < Path(train[0].uri).stat().st_size < 120_000  # a photo's size
    # the same seed writes the same bytes; another seed other photos and captions
    rehearsal.generate(tmp_path / "b", images=40, seed=3)
    rehearsal.generate(tmp_path / "c", images=40, seed=4)
    assert (tmp_path / "b" / "Flickr8k_text" / "Flickr8k.token.txt").read_bytes() == raw
    assert (tmp_path / "c" / "Flickr8k_text" / "Flickr8k.token.txt").read_bytes() != raw


def test_caption_statistics_are_flickr8k_like():
    rng = np.random.default_rng(0)
    lengths = rehearsal.caption_lengths(rng, 40_000)
    assert 10.0 < lengths.mean() < 12.5 and lengths.max() == 35 and lengths.min() >= 3
    words = rehearsal.vocabulary()
    assert len(words) == len(set(words)) == 8000 and words[:3] == ["a", "in", "the"]
