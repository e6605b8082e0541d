"""A Flickr8k-sized rehearsal data set: the size, shape and quirks of Flickr8k, for measuring
scale, not quality. Its captions are unrelated to its images: a model trained on it learns
word statistics only, and its BLEU says nothing about captioning.

  - 8,091 real-sized JPEGs (500x375, quality 85, about 45 KB: decoding costs what a photo's
    does), each a random crop, flip, colour jitter and noise of a photo scikit-image ships;
  - five captions per image from a vocabulary of about 8,000 words with Zipf-like
    frequencies and Flickr8k-like lengths (mean about 11 words, a tail to 35);
  - the Flickr8k layout: Flicker8k_Dataset/, Flickr8k_text/Flickr8k.token.txt and the three
    split lists (6,000/1,000/1,000 images; the other 91 in none), with the real copy's quirks:
    CRLF line ends, and an id with captions and a split entry but no image file.
Deterministic per seed (image i from its own generator seeded by (seed, i))."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from capfleet.core.errors import CapfleetError
from capfleet.model.data import FLICKR_IMAGES_DIRS, FLICKR_SPLIT_FILES, FLICKR_TEXT_DIR

PHOTOS = (
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
SIZE = (500, 375)  # width, height: a typical Flickr8k photo
FLICKR8K = {"images": 8091, "train": 6000, "dev": 1000, "test": 1000}
VOCAB = 8000
# Flickr8k's most frequent words, in about their order; the rest of the vocabulary is made up
COMMON = (
    "a in the on is and dog with man of two white black boy are woman girl to wearing at "
    "people water red young brown an his blue dogs running through playing while shirt down "
    "standing ball little grass snow child person jumping over three front sitting holding "
    "up field small by large green one group yellow her walking children men into air beach "
    "near mouth jumps another for street runs its from riding stands as bike girls outside "
    "other out pink orange"
).split()
NO_IMAGE_ID = "2258277193_586949ec62.jpg.1"  # as in the real token file: captions, no photo


def source_photos() -> list:
    """scikit-image's sample photos, as PIL images."""
    try:
        import skimage
    except ImportError:
        raise CapfleetError(
            "the rehearsal data set is made from scikit-image's sample photos: "
            "pip install scikit-image (or capfleet[rehearsal])"
        ) from None
    from PIL import Image

    root = Path(skimage.__file__).parent / "data"
    return [Image.open(root / name).convert("RGB") for name in PHOTOS]


def photo(photos: list, i: int, rng: np.random.Generator, size: tuple[int, int] = SIZE):
    """A photo-like image: a random crop of one source photo, resized, maybe flipped, colour
    jittered and noised (PIL image)."""
    from PIL import Image, ImageEnhance

    img = photos[i % len(photos)]
    w, h = img.size
    scale = rng.uniform(0.55, 1.0)
    cw, ch = int(w * scale), int(min(h, w * scale * size[1] / size[0]))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = img.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.75, 1.25))
    crop = ImageEnhance.Color(crop).enhance(rng.uniform(0.6, 1.4))
    arr = np.asarray(crop, np.float32) + rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def vocabulary(size: int = VOCAB, seed: int = 0) -> list[str]:
    """`size` distinct lower-case words: Flickr8k's commonest first, then made-up ones."""
    rng = np.random.default_rng([seed, 1 << 20])
    onsets = "b c d f g h j k l m n p r s t v w z br cl dr fl gr pl st tr sh ch".split()
    vowels = "a e i o u ai ea oo".split()
    codas = ["", "n", "r", "s", "t", "l", "nd", "ng", "st", "ck"]
    words, seen = list(COMMON), set(COMMON)
    while len(words) < size:
        n = int(rng.integers(1, 4))
        w = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(n))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words[:size]


def word_frequencies(n: int) -> np.ndarray:
    """Zipf-like shares of n words, commonest first (as a language's word counts fall off)."""
    p = 1.0 / np.arange(1, n + 1) ** 1.05
    return p / p.sum()


def caption_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """Words per caption: mean about 11, most 6 to 16, a tail to 35 (as Flickr8k's)."""
    body = np.round(rng.gamma(6.0, 1.65, n) + 1)
    tail = rng.random(n) < 0.02
    body[tail] = rng.integers(18, 36, int(tail.sum()))
    return np.clip(body, 3, 35).astype(int)


def generate(out: str | Path, images: int = FLICKR8K["images"], seed: int = 0) -> dict:
    """Write the rehearsal set under `out`; returns counts. `images` below 8,091 keeps the
    split shares (for tests); the default is Flickr8k's size."""
    if images < 10:
        raise CapfleetError(f"images must be >= 10, got {images}")
    root = Path(out)
    img_dir = root / FLICKR_IMAGES_DIRS[0]
    text_dir = root / FLICKR_TEXT_DIR
    img_dir.mkdir(parents=True, exist_ok=True)
    text_dir.mkdir(parents=True, exist_ok=True)
    photos = source_photos()
    words = vocabulary(seed=seed)
    zipf = word_frequencies(len(words))
    names, tokens = [], []
    for i in range(images):
        rng = np.random.default_rng([seed, i])
        name = f"{int(rng.integers(10**9, 4 * 10**9))}_{int(rng.integers(16**9, 16**10)):010x}.jpg"
        photo(photos, i, rng).save(img_dir / name, "JPEG", quality=85)
        names.append(name)
        for k, n in enumerate(caption_lengths(rng, 5)):
            text = " ".join(words[j] for j in rng.choice(len(words), n, p=zipf))
            tokens.append(f"{name}#{k}\t{text[0].upper()}{text[1:]} .")
    shares = {s: FLICKR8K[s] / FLICKR8K["images"] for s in ("train", "dev", "test")}
    n_train, n_dev = int(images * shares["train"]), max(1, int(images * shares["dev"]))
    n_test = max(1, int(images * shares["test"]))
    splits = {
        "train": names[:n_train] + [NO_IMAGE_ID],  # listed, captioned, no image: as the real one
        "dev": names[n_train : n_train + n_dev],
        "test": names[n_train + n_dev : n_train + n_dev + n_test],
    }
    rng = np.random.default_rng([seed, 1 << 21])
    tokens += [f"{NO_IMAGE_ID}#{k}\tA dog runs on the grass ." for k in range(5)]
    crlf = "\r\n"  # the real text files have Windows line ends
    (text_dir / "Flickr8k.token.txt").write_bytes((crlf.join(tokens) + crlf).encode())
    for split, listed in splits.items():
        order = list(listed)
        rng.shuffle(order)
        (text_dir / FLICKR_SPLIT_FILES[split]).write_bytes((crlf.join(order) + crlf).encode())
    return {
        "images": images,
        **{s: len(v) for s, v in splits.items()},
        "in_no_split": images - n_train - n_dev - n_test,
        "vocabulary": len(words),
    }
