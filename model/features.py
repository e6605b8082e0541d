"""Loading images for training and caching frozen-encoder features (npy), on disk or in an
object store (a cache every node of a cluster reads)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from capfleet.core.artifacts import write_bytes_atomic, write_json_atomic
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import StorePath, place
from capfleet.model.data import ImageRecord, read_split, record_stats
from capfleet.model.encoders import encoder_info
from capfleet.model.images import ImageError, decode_image, preprocess


def decode_files(
    uris: Sequence[str], size: int, workers: int = 1
) -> tuple[list, list[int], list[str]]:
    """Each file decoded to (size, size, 3) uint8: (the images, the positions that decoded,
    "uri: reason" for the others). `workers` threads decode at once (Pillow decodes and
    resizes outside the GIL: a process that holds several CPUs decodes on all of them)."""

    def one(uri: str):
        try:
            data = place(uri).read_bytes()  # a local file or an object in a store
        except OSError as e:
            return f"{uri}: {e.strerror or e}"
        out = decode_image(data, (size, size))
        return f"{uri}: {out}" if isinstance(out, ImageError) else out

    if workers > 1 and len(uris) > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, uris))
    else:
        results = [one(u) for u in uris]
    images, kept, bad = [], [], []
    for i, out in enumerate(results):
        if isinstance(out, str):
            bad.append(out)
        else:
            images.append(out)
            kept.append(i)
    return images, kept, bad


def load_images(
    records: Sequence[ImageRecord],
    size: int,
    log: Callable[[str], None] = print,
    workers: int = 1,
) -> tuple[np.ndarray, list[ImageRecord]]:
    """Decode every record's image to (N, size, size, 3) uint8 on `workers` threads, skipping
    (and reporting) bad ones. Returns the images and the records that decoded, in order."""
    images, positions, bad = decode_files([r.uri for r in records], size, workers)
    kept = [records[i] for i in positions]
    if bad:
        log(f"skipped {len(bad)} unreadable images, e.g. {bad[0]}")
    if not images:
        raise CapfleetError(f"none of {len(records)} images could be read, e.g. {bad[0]}")
    return np.stack(images), kept


def load_split(
    data: str,
    split: str,
    size: int,
    limit: int = 0,
    log: Callable[[str], None] = print,
    workers: int = 1,
) -> tuple[np.ndarray, list[ImageRecord]]:
    """A training data set's split (its first `limit` images; 0 = all), decoded by `load_images`
    to (N, size, size, 3) uint8, with the records that decoded."""
    records = read_split(data, split)
    return load_images(records[:limit] if limit else records, size, log, workers)


def _backbone_hash(encoder: str, weights: str):
    """A sha256 of the backbone: the encoder and its weights (a weights file by its size and
    mtime too)."""
    h = hashlib.sha256(f"{encoder}\n{weights}\n".encode())
    if os.path.isfile(weights):
        st = os.stat(weights)
        h.update(f"{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h


def cache_key(encoder: str, weights: str, records: Sequence[ImageRecord]) -> str:
    """Features depend on the backbone (encoder and weights) and the exact images: each by its
    id, file name, size and mtime, not by its folder, so that a data set in an object store and
    a node's copy of it (core.storage.mirror keeps the times) share their features."""
    h = _backbone_hash(encoder, weights)
    for r, (size, mtime) in zip(records, record_stats(records), strict=True):
        name = place(r.uri).name
        h.update(f"{r.image_id}\t{name}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()[:20]


def cache_file(cache_dir, encoder: str, weights_id: str, records) -> Path | StorePath:
    """The cache file of these records' features: `<encoder>-<key>.npy` (its ids in a .json
    beside it, its parts, while computed across a cluster, in a .parts folder), in a local
    folder or an object store."""
    return place(cache_dir) / f"{encoder}-{cache_key(encoder, weights_id, records)}.npy"


def backbone_file(cache_dir, encoder: str, weights_id: str) -> Path | StorePath:
    """The frozen backbone as an fp32 LiteRT flatbuffer, kept beside its features:
    `<encoder>-<key>.tflite` (compression/export.py writes it, FeatureWorker runs it)."""
    key = _backbone_hash(encoder, weights_id).hexdigest()[:20]
    return place(cache_dir) / f"{encoder}-{key}.tflite"


def load_npy(path: Path | StorePath) -> np.ndarray:
    """An .npy file from disk or an object store (never a pickled object array)."""
    if isinstance(path, StorePath):
        return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    return np.load(path, allow_pickle=False)


def npy_rows(path: Path | StorePath) -> int:
    """The rows of an .npy file, from its header alone (a range read in a store)."""
    with path.open("rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape = np.lib.format.read_array_header_1_0(f)[0]
        else:
            shape = np.lib.format.read_array_header_2_0(f)[0]
    return int(shape[0]) if shape else 0


def write_cache(
    cache_dir, encoder: str, weights_id: str, records, feats: np.ndarray
) -> Path | StorePath:
    """The .npy and its .json of ids, each written atomically (a crash leaves no half file)."""
    path = cache_file(cache_dir, encoder, weights_id, records)
    buf = io.BytesIO()
    np.save(buf, feats)
    write_bytes_atomic(path, buf.getvalue())
    ids = {"encoder": encoder, "weights": weights_id, "image_ids": [r.image_id for r in records]}
    write_json_atomic(path.with_suffix(".json"), ids)
    return path


def find_cached(
    cache_dir: str | Path, encoder: str, weights_id: str, records: Sequence[ImageRecord]
) -> tuple[np.ndarray, list[ImageRecord]] | None:
    """A split's features already in the cache, found without decoding an image, with the
    records they are of: the file of every listed record (all decoded), else the one the
    feature job joined from its parts for the records that decoded (its parts name them).
    None when neither is there."""
    path = cache_file(cache_dir, encoder, weights_id, records)
    kept = list(records)
    if not path.is_file():
        metas = sorted(path.with_suffix(".parts").glob("part-*.json"))
        if not metas:
            return None
        ids = {i for m in metas for i in json.loads(m.read_text())["ids"]}
        kept = [r for r in records if r.image_id in ids]
        path = cache_file(cache_dir, encoder, weights_id, kept)
        if not path.is_file():
            return None
    try:
        listed = json.loads(path.with_suffix(".json").read_text())["image_ids"]
        feats = load_npy(path)
    except (OSError, ValueError, KeyError):
        return None  # unreadable: computed again
    if listed != [r.image_id for r in kept] or len(feats) != len(kept):
        return None
    return feats, kept


def predict_batches(model, images: np.ndarray, batch: int, style: str | None = None):
    """A model's outputs for `images` (a Keras model, or anything with its predict_on_batch:
    FeatureWorker), `batch` at a time (a CNN's activations grow with
    the batch: VGG16's are 13 MB an image and layer), each batch preprocessed in `style`
    first when one is given."""
    return np.concatenate(
        [
            model.predict_on_batch(
                preprocess(images[i : i + batch], style) if style else images[i : i + batch]
            )
            for i in range(0, len(images), batch)
        ]
    )


def cached_features(
    backbone,
    encoder: str,
    weights_id: str,
    style: str,
    images: np.ndarray,
    records: Sequence[ImageRecord],
    cache_dir: str | Path,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
) -> np.ndarray:
    """(N, F) float32 features of a frozen backbone, computed once per (encoder, weights, images)
    and kept as npy in `cache_dir` (written whole, so a crash leaves no half file)."""
    place(cache_dir).mkdir(parents=True, exist_ok=True)
    path = cache_file(cache_dir, encoder, weights_id, records)
    if path.is_file():
        log(f"features: cached {path.name}")
        return load_npy(path)
    log(f"features: computing {encoder} for {len(images)} images")
    out = predict_batches(backbone, images, batch_size, style).astype(np.float32)
    write_cache(cache_dir, encoder, weights_id, records, out)
    return out


# -- the backbone flatbuffer the feature job runs (jobs/train/feature_job.py) ---------------


def backbone_problem(model_file: str | Path, encoder: str) -> str | None:
    """Why `model_file` is not `encoder`'s backbone flatbuffer (image -> features, as
    export_backbone writes it), or None when it is. Read without delegates: a fraction of a
    second and a few MB even for VGG16, so the driver checks a cached file before a job's actors
    load it. (It parses the file and its signature; it cannot tell altered weights.)"""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    info = encoder_info(encoder)
    try:
        it = Interpreter(
            model_path=str(model_file),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        runner = it.get_signature_runner()
        image = runner.get_input_details().get("image")
        feats = runner.get_output_details().get("features")
    except (OSError, ValueError, RuntimeError) as e:
        return f"LiteRT cannot load it: {(str(e).strip() or repr(e)).splitlines()[0]}"
    want = [info.input_size, info.input_size, 3]
    if image is None or list(image["shape_signature"][1:]) != want:
        return f"its signature takes no image of {want}"
    if feats is None or int(feats["shape"][-1]) != info.feature_dim:
        return f"its signature gives no {info.feature_dim} features"
    return None
