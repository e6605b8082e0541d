import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capfleet.model.images import (
    EMPTY,
    NOT_AN_IMAGE,
    TOO_LARGE,
    TRUNCATED,
    ImageError,
    decode_image,
    preprocess,
)

SKIMAGE_DATA = Path(__import__("skimage").__file__).parent / "data"


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def half_red_half_blue(w=40, h=20) -> np.ndarray:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    return arr


@pytest.mark.parametrize(
    ("style", "module"),
    [("caffe", "vgg16"), ("caffe", "resnet50"), ("tf", "mobilenet_v2")],
)
def test_preprocess_matches_keras_applications(style, module):
    import importlib

    keras_pre = importlib.import_module(f"tf_keras.applications.{module}").preprocess_input
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    expected = keras_pre(batch.astype(np.float32).copy())
    np.testing.assert_allclose(preprocess(batch, style), expected, rtol=0, atol=1e-4)
    kept = np.full(batch.shape, np.nan, np.float32)  # a buffer reused batch after batch
    assert preprocess(batch, style, out=kept) is kept
    np.testing.assert_array_equal(kept, preprocess(batch, style))


def test_preprocess_unit_and_unknown_style():
    assert preprocess(np.full((1, 1, 3), 255, np.uint8), "unit").max() == 1.0
    with pytest.raises(ValueError, match="allowed: caffe, tf, unit"):
        preprocess(np.zeros((1, 1, 3), np.uint8), "torch")


def test_decode_resizes_to_height_width():
    data = encode(Image.fromarray(half_red_half_blue()), "PNG")
    out = decode_image(data, (10, 30))
    assert isinstance(out, np.ndarray) and out.shape == (10, 30, 3) and out.dtype == np.uint8
    assert tuple(out[5, 2]) == (255, 0, 0) and tuple(out[5, 27]) == (0, 0, 255)


def test_exif_orientation_is_applied():
    arr = half_red_half_blue(40, 20)  # red left, blue right, landscape
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored image is shown rotated
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, (40, 20))  # displayed portrait: 40 high, 20 wide
    assert isinstance(out, np.ndarray)
    top, bottom = out[3, 10].astype(int), out[36, 10].astype(int)
    assert top[0] > 200 and top[2] < 60  # red now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_grayscale_rgba_palette_cmyk_and_16bit():
    grey = decode_image(encode(Image.new("L", (8, 8), 100), "PNG"), (4, 4))
    assert (grey == 100).all()
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    assert (decode_image(encode(rgba, "PNG"), (4, 4)) == 255).all()
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))  # half-transparent black on white
    assert abs(int(decode_image(encode(half, "PNG"), (4, 4))[0, 0, 0]) - 127) <= 1
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    assert tuple(decode_image(encode(pal, "GIF"), (4, 4))[0, 0]) == (0, 255, 0)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(cmyk, "JPEG", quality=100), (4, 4))
    assert out[0, 0, 0] > 240 and out[0, 0, 1] < 20
    sixteen = Image.fromarray(np.full((8, 8), 40000, np.uint16))  # 16-bit grey
    out = decode_image(encode(sixteen, "PNG"), (4, 4))
    assert abs(int(out[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1  # scaled, not clipped


def test_large_jpeg_uses_draft_mode_and_stays_correct():
    big = Image.fromarray(np.tile(half_red_half_blue(400, 300), (4, 4, 1)))  # 1600x1200
    data = encode(big, "JPEG", quality=90)
    out = decode_image(data, (120, 160))
    assert out.shape == (120, 160, 3)
    assert out[60, 10, 0] > 200 and out[60, 30, 2] > 200  # tiles survived the reduced decode


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", EMPTY),
        (b"this is a text file, not a picture\n", NOT_AN_IMAGE),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, None),  # a PNG header and garbage
    ],
)
def test_bad_bytes_become_errors(data, reason):
    out = decode_image(data, (8, 8))
    assert isinstance(out, ImageError)
    if reason:
        assert out.reason == reason


def test_truncated_jpeg_and_png():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    for fmt in ("JPEG", "PNG"):
        data = encode(img, fmt)
        out = decode_image(data[: len(data) // 2], (8, 8))
        assert isinstance(out, ImageError) and out.reason == TRUNCATED, (fmt, out)


def test_decompression_bomb_refused_by_declared_size():
    # A tiny file declaring 20000 x 20000 pixels: refused before decoding anything.
    data = encode(Image.new("1", (20000, 20000)), "PNG")
    assert len(data) < 100_000
    out = decode_image(data, (8, 8), max_pixels=50_000_000)
    assert isinstance(out, ImageError) and out.reason == TOO_LARGE
    small = decode_image(encode(Image.new("RGB", (300, 300)), "PNG"), (8, 8), max_pixels=10_000)
    assert isinstance(small, ImageError) and small.reason == TOO_LARGE


def test_the_declared_size_limit_is_max_pixels_not_pils_own():
    # 95 MP: above PIL's 89.5 MP warning, below capfleet's 100 MP MAX_PIXELS: decoded
    from capfleet.model.images import MAX_PIXELS

    assert MAX_PIXELS == 100_000_000
    out = decode_image(encode(Image.new("1", (10_000, 9_500), 1), "PNG"), (8, 8))
    assert not isinstance(out, ImageError), out
    assert out.shape == (8, 8, 3) and out.min() == 255
    over = decode_image(encode(Image.new("1", (10_000, 10_001)), "PNG"), (8, 8))
    assert isinstance(over, ImageError) and over.reason == TOO_LARGE


@pytest.mark.parametrize(
    "name",
    [
        "astronaut.png",
        "chelsea.png",
        "rocket.jpg",
        "camera.png",
        "logo.png",
        "hubble_deep_field.jpg",
        "retina.jpg",
        "no_time_for_that_tiny.gif",
    ],
)
def test_real_photos_from_scikit_image_decode(name):
    data = (SKIMAGE_DATA / name).read_bytes()
    out = decode_image(data, (224, 224))
    assert isinstance(out, np.ndarray), out
    assert out.shape == (224, 224, 3) and out.std() > 5  # a real picture, not a blank
