"""Decoding a shard: every image read and decoded once per input size the bundles need."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from capfleet.model.bulk.reader import read_uri
from capfleet.model.images import ImageError, decode_image


def decode_batch(batch: dict, sizes: Sequence[int]) -> dict:
    """Read and decode every image of a shard for each input size the bundles need.

    batch: {"shard": (1,), "image_id": (1,) list, "uri": (1,) list} -> adds, per size S,
    "image_S": (1, N, S, S, 3) uint8 and "error": (1,) list of N reasons ("" when fine).
    """
    uris = list(batch["uri"][0])
    errors = [""] * len(uris)
    images = {s: np.zeros((len(uris), s, s, 3), np.uint8) for s in sizes}
    for i, uri in enumerate(uris):
        data = read_uri(uri)
        if isinstance(data, ImageError):
            errors[i] = str(data)
            continue
        for s in sizes:
            out = decode_image(data, (s, s))
            if isinstance(out, ImageError):
                errors[i] = str(out)
                break
            images[s][i] = out
    result = dict(batch)
    result["error"] = np.array([np.array(errors, dtype=object)], dtype=object)
    for s, arr in images.items():
        result[f"image_{s}"] = arr[None]
    return result
