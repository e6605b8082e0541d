"""Image decoding and backbone preprocessing with PIL + numpy only (no TensorFlow).

Decoding never raises on a bad file: it returns an `ImageError` with a reason, so that one bad
image becomes one error row and never stops a batch.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse images whose declared size exceeds this many pixels before decoding them (a
# decompression bomb declares a huge size in a tiny file). 100 MP covers large camera photos.
MAX_PIXELS = 100_000_000

# The "caffe" mode of keras.applications (VGG16, ResNet50): BGR order, ImageNet mean subtracted.
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)

PREPROCESS_STYLES = ("caffe", "tf", "unit")

# Error reasons, stable strings that land in the output's `error` column.
EMPTY, TRUNCATED, NOT_AN_IMAGE, TOO_LARGE, UNREADABLE, UNSUPPORTED = (
    "empty",
    "truncated",
    "not_an_image",
    "too_large",
    "unreadable",
    "unsupported_format",
)

# The formats PIL may decode here: pure decoders of raster images. Anything else PIL knows
# (EPS and PostScript, which it hands to Ghostscript; PDF; fonts; ...) is an error row, even
# when the file is named .jpg.
SAFE_FORMATS = (
    "JPEG",
    "PNG",
    "WEBP",
    "GIF",
    "BMP",
    "TIFF",
    "PPM",
    "ICO",
    "AVIF",
    "JPEG2000",
    "QOI",
)


def open_image(data: bytes) -> Image.Image | ImageError:
    """PIL's image for `data`, opened by one of SAFE_FORMATS only; a file of any other format
    is `unsupported_format` (named from its first bytes, without running anything)."""
    Image.init()  # every plugin registered, so that each of SAFE_FORMATS is known by name
    try:
        with warnings.catch_warnings():
            # PIL warns from 89.5 MP (its own MAX_IMAGE_PIXELS) and raises from twice that; the
            # limit is the caller's, checked on the opened image's size
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=SAFE_FORMATS)
    except UnidentifiedImageError:
        other = sniff_format(data)
        if other:
            return ImageError(UNSUPPORTED, f"{other} images are not decoded here")
        return ImageError(NOT_AN_IMAGE, "not a recognised image format")


def sniff_format(data: bytes) -> str | None:
    """The PIL format whose signature check accepts `data`'s first bytes, if any (the check
    reads bytes only: no plugin opens the file)."""
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept and accept(prefix):
                return name
        except Exception:  # noqa: BLE001, S112  a plugin's check that fails accepts nothing
            continue
    return None


@dataclass(frozen=True)
class ImageError:
    """Why an image could not be decoded: `reason` is one of the constants above."""

    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def decode_image(
    data: bytes, size: tuple[int, int], max_pixels: int = MAX_PIXELS
) -> np.ndarray | ImageError:
    """Decode image bytes to RGB uint8 of shape (height, width, 3), resized to `size`.

    Args:
        data: the file's bytes (JPEG, PNG, GIF, BMP, TIFF, WebP...).
        size: (height, width) of the output.
        max_pixels: images declaring more pixels than this are refused as TOO_LARGE.
    Returns:
        (H, W, 3) uint8, or an ImageError; never raises for a bad file.
    """
    if not data:
        return ImageError(EMPTY, "file has no bytes")
    height, width = size
    try:
        img = open_image(data)
        if isinstance(img, ImageError):
            return img
        if img.width * img.height > max_pixels:
            return ImageError(TOO_LARGE, f"{img.width}x{img.height} exceeds {max_pixels} pixels")
        if img.format == "JPEG":
            # Let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) that still covers the target:
            # a large photo decodes several times faster. EXIF rotation may swap the axes.
            side = max(height, width)
            img.draft("RGB", (side, side))
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)
    except Image.DecompressionBombError as e:
        return ImageError(TOO_LARGE, str(e))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        message = str(e)
        if "truncated" in message or "broken data stream" in message or isinstance(e, EOFError):
            return ImageError(TRUNCATED, message)
        return ImageError(UNREADABLE, message or type(e).__name__)
    except Exception as e:  # noqa: BLE001  PIL raises many types on corrupt files; one row each
        return ImageError(UNREADABLE, f"{type(e).__name__}: {e}")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha and palette transparency composited on white, 16-bit scaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey (PNG/TIFF): scale to 8 bits rather than clip at 255.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        grey = np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        span = max(float(arr.max() - arr.min()), 1e-12)
        grey = ((arr - arr.min()) * (255.0 / span)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "P" or img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGB


def preprocess(batch: np.ndarray, style: str, out: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 (..., H, W, 3) -> float32 model input in a backbone's convention, written into
    `out` when given (a float32 array of the batch's shape that a caller reuses batch after
    batch, so no fresh pages are faulted in for each one).

    Styles match keras.applications' `preprocess_input`:
      caffe: BGR order, ImageNet mean subtracted (VGG16, ResNet50);
      tf:    scaled to [-1, 1] (MobileNetV2);
      unit:  scaled to [0, 1] (the small CNN).
    """
    if style not in PREPROCESS_STYLES:
        raise ValueError(
            f"unknown preprocessing style {style!r}; allowed: {', '.join(PREPROCESS_STYLES)}"
        )
    x = np.asarray(batch)
    if out is None:
        out = np.empty(x.shape, np.float32)
    elif out.shape != x.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {x.shape}, got {out.dtype} {out.shape}")
    # into `out`, in float32 as keras computes it
    if style == "caffe":
        np.subtract(x[..., ::-1], CAFFE_MEAN_BGR, out=out, dtype=np.float32)
    elif style == "tf":
        np.divide(x, np.float32(127.5), out=out, dtype=np.float32)
        out -= np.float32(1.0)
    else:
        np.divide(x, np.float32(255.0), out=out, dtype=np.float32)
    return out
