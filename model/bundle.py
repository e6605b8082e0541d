"""The model bundle: a directory that captions images with ai_edge_litert alone.

    encoder.tflite       preprocessed images (B, S, S, 3) -> img_proj (B, U)
    decoder_step.tflite  (token, h, c, img_proj) -> (logits, h', c')
    vocab.json           the Vocabulary
    manifest.json        recipe, config, sizes raw and gzip, sha256 of every file, source, versions

Nothing here imports TensorFlow: a captioning process loads LiteRT alone, not all of TF.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from capfleet.core.artifacts import (
    package_versions,
    read_manifest_json,
    write_bytes_atomic,
    write_json_atomic,
)
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import StorePath, node_cache, place
from capfleet.model.decoding import decode
from capfleet.model.images import preprocess
from capfleet.model.text import Vocabulary

BUNDLE_FORMAT = "capfleet-bundle/1"
ENCODER_FILE, DECODER_FILE, VOCAB_FILE, MANIFEST_FILE = (
    "encoder.tflite",
    "decoder_step.tflite",
    "vocab.json",
    "manifest.json",
)
MB = 1e6  # sizes are reported in decimal megabytes, as the study did


class BundleError(CapfleetError):
    """A bundle directory is missing, incomplete, or does not match its manifest."""


REQUIRED_FILES = (ENCODER_FILE, DECODER_FILE, VOCAB_FILE)


GZIP_PIECE = 8 * 2**20  # bytes deflated apart when a file's gzip size is measured on threads
GZIP_WINDOW = 32 * 2**10  # deflate's window: each piece is primed with the bytes before it


def deflate_piece(data: bytes, start: int) -> bytes:
    """Raw deflate (level 6) of the GZIP_PIECE bytes of `data` from `start`, primed with the
    window before it, ended with a sync flush (the last piece: a final block): the pieces in
    order are one deflate stream of `data`, as pigz writes it."""
    end, view = min(start + GZIP_PIECE, len(data)), memoryview(data)
    window = view[max(0, start - GZIP_WINDOW) : start]
    z = zlib.compressobj(6, zlib.DEFLATED, -15, **({"zdict": window} if window else {}))
    last = zlib.Z_FINISH if end == len(data) else zlib.Z_SYNC_FLUSH
    return z.compress(view[start:end]) + z.flush(last)


def gzip_bytes(data: bytes, threads: int = 1) -> int:
    """The size of `data` as a gzip file at level 6, its pieces deflated on `threads` threads
    (zlib frees the GIL, so a large bundle need not hold one core): a gzip header, the
    pieces of `deflate_piece`, a CRC-32 and size trailer. A few bytes a piece larger than
    deflating it as one piece."""
    starts = range(0, max(len(data), 1), GZIP_PIECE)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        body = sum(pool.map(lambda start: len(deflate_piece(data, start)), starts))
    return 10 + body + 8


def file_record(data: bytes, threads: int = 1) -> dict:
    """Raw size, gzip size (level 6, in memory, `gzip_bytes`) and sha256 of one file's bytes."""
    return {
        "bytes": len(data),
        "gzip_bytes": gzip_bytes(data, threads),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def write_bundle(
    out_dir: str | Path,
    encoder_tflite: bytes,
    decoder_tflite: bytes,
    vocab: Vocabulary,
    info: dict,
    threads: int = 1,
) -> dict:
    """Write a bundle; `info` (config, encoder, recipe, source...) goes into the manifest.
    Its files' gzip sizes are measured on `threads` threads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / ENCODER_FILE, encoder_tflite)
    write_bytes_atomic(out / DECODER_FILE, decoder_tflite)
    vocab.save(out / VOCAB_FILE)
    files = {n: file_record((out / n).read_bytes(), threads) for n in REQUIRED_FILES}
    manifest = {
        "format": BUNDLE_FORMAT,
        **info,
        "files": files,
        "size_mb": round(sum(f["bytes"] for f in files.values()) / MB, 4),
        "gzip_size_mb": round(sum(f["gzip_bytes"] for f in files.values()) / MB, 4),
        "versions": package_versions("tensorflow", "ai-edge-litert", "capfleet"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(out / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(bundle_dir: str | Path, verify: bool = True) -> dict:
    """The bundle's manifest; with `verify`, every file's size and sha256 is checked (which
    reads every file; without, only the manifest is read)."""
    if not verify:
        d = place(bundle_dir)
        return read_manifest_json(d / MANIFEST_FILE, BUNDLE_FORMAT, BundleError, "bundle")
    return load_bundle_files(bundle_dir, verify)[0]


def load_bundle_files(bundle_dir: str | Path, verify: bool = True) -> tuple[dict, dict]:
    """(manifest, {file name: bytes}) with every required file checked against the manifest,
    so that what runs is exactly what was hashed. The bundle may be in an object store."""
    d = place(bundle_dir)
    manifest = read_manifest_json(d / MANIFEST_FILE, BUNDLE_FORMAT, BundleError, "bundle")
    files = manifest.get("files")
    missing = [n for n in REQUIRED_FILES if not isinstance(files, dict) or n not in files]
    if missing:
        raise BundleError(f"{d}: the manifest lists no {missing[0]}")
    for key in ("config", "encoder"):
        if not isinstance(manifest.get(key), dict):
            raise BundleError(f"{d}: the manifest has no {key!r} section")
    data = {}
    for name in REQUIRED_FILES:
        p = d / name
        if not p.is_file():
            raise BundleError(f"{d}: {name} is missing")
        data[name] = p.read_bytes()
        want = files[name]
        if verify and (
            len(data[name]) != want.get("bytes")
            or hashlib.sha256(data[name]).hexdigest() != want.get("sha256")
        ):
            raise BundleError(f"{d}: {name} does not match the manifest (changed or corrupt)")
    return manifest, data


def check_bundle(bundle_dir: str | Path) -> dict:
    """Refuse, before any work, a bundle that could not caption: files that do not match the
    manifest, a .tflite that does not load (0 bytes, not a flatbuffer) or lacks the signature
    capfleet writes, an encoder whose input is not the manifest's input_size, or a vocabulary
    that does not cover the decoder's output. Returns the manifest."""
    from ai_edge_litert.interpreter import Interpreter

    d = place(bundle_dir)
    manifest, models = load_bundle_files(d)
    try:
        size = int(manifest["encoder"]["input_size"])
        units = int(manifest["config"]["units"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{d}/{MANIFEST_FILE}: lacks {e} in encoder/config") from e
    shapes = {}
    for name, want in ((ENCODER_FILE, ("image", "img_proj")), (DECODER_FILE, ("token", "logits"))):
        try:
            runner = Interpreter(model_content=models[name]).get_signature_runner()
            inputs, outputs = runner.get_input_details(), runner.get_output_details()
            shapes[name] = (inputs[want[0]]["shape_signature"], outputs[want[1]]["shape_signature"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise BundleError(f"{d}/{name}: not a capfleet model LiteRT can load ({e})") from e
    image, proj = ([int(v) for v in s] for s in shapes[ENCODER_FILE])
    if image[1:] != [size, size, 3] or proj[-1] != units:
        raise BundleError(
            f"{d}/{ENCODER_FILE}: takes {image[1:]} -> {proj[-1]}, but the manifest says "
            f"[{size}, {size}, 3] -> {units}"
        )
    vocab = Vocabulary.from_bytes(models[VOCAB_FILE], d / VOCAB_FILE)
    logits = int(shapes[DECODER_FILE][1][-1])
    if len(vocab) != logits:
        raise BundleError(
            f"{d}: {VOCAB_FILE} has {len(vocab)} tokens, but the decoder scores {logits}"
        )
    return manifest


# images per encoder call: a CNN's activations grow with the batch (a VGG16 fp32 bundle at the
# caption job's largest batches would take an actor to many GB; at 32 its arena stays small)
ENCODE_BATCH = 32


class BundleRunner:
    """Captions batches of images with a bundle, on ai_edge_litert only.

    Interpreters are kept one per batch size: LiteRT's XNNPACK re-initializes on every resize.
    One BundleRunner per thread.
    """

    def __init__(self, bundle_dir: str | Path, num_threads: int = 1, beam_width: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter
        if beam_width < 1:
            raise CapfleetError(f"beam_width must be >= 1, got {beam_width}")
        self.dir = place(bundle_dir)
        self.manifest, self._models = load_bundle_files(self.dir)
        self.vocab = Vocabulary.from_bytes(self._models[VOCAB_FILE], self.dir / VOCAB_FILE)
        self.num_threads = num_threads
        self.beam_width = beam_width
        try:
            self.max_len = int(self.manifest["config"]["max_len"])
            self.input_size = int(self.manifest["encoder"]["input_size"])
            self.preprocess_style = str(self.manifest["encoder"]["preprocess"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{self.dir}: manifest lacks {e} in config/encoder") from e
        self._runners: dict[tuple[str, int], object] = {}
        self._pixels: np.ndarray | None = None  # encode_pixels' float buffer

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.input_size, self.input_size)

    def _runner(self, name: str, batch: int):
        key = (name, batch)
        if key not in self._runners:
            it = self._interpreter(model_content=self._models[name], num_threads=self.num_threads)
            self._runners[key] = it.get_signature_runner()
        return self._runners[key]

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed images (B, S, S, 3) float32 -> img_proj (B, U), ENCODE_BATCH images
        per encoder call (the decoder takes the whole batch)."""
        return self._encode(images, lambda chunk: np.ascontiguousarray(chunk, dtype=np.float32))

    def encode_pixels(self, images_uint8: np.ndarray) -> np.ndarray:
        """RGB uint8 images (B, S, S, 3) -> img_proj (B, U), each ENCODE_BATCH preprocessed
        into one float buffer this runner keeps: a batch's float copy would be 4 times its
        pixels, in fresh pages each call (a batch of 256 at 224 px: 154 MB)."""
        if self._pixels is None:
            self._pixels = np.empty((ENCODE_BATCH, *self.image_size, 3), np.float32)
        return self._encode(
            np.asarray(images_uint8),
            lambda chunk: preprocess(chunk, self.preprocess_style, self._pixels[: len(chunk)]),
        )

    def _encode(self, images: np.ndarray, prepare) -> np.ndarray:
        want = (self.input_size, self.input_size, 3)
        if images.ndim != 4 or images.shape[1:] != want:
            raise CapfleetError(f"images must be (B, {want[0]}, {want[1]}, 3), got {images.shape}")
        out = []
        for i in range(0, len(images), ENCODE_BATCH):
            chunk = prepare(images[i : i + ENCODE_BATCH])
            out.append(self._runner(ENCODER_FILE, len(chunk))(image=chunk)["img_proj"])
        if not out:  # no images
            return np.zeros((0, int(self.manifest["config"]["units"])), np.float32)
        return np.concatenate(out) if len(out) > 1 else out[0]

    def step(self, tokens, h, c, img_proj):
        run = self._runner(DECODER_FILE, len(tokens))
        out = run(token=tokens, h=h, c=c, img_proj=img_proj)
        return out["logits"], out["h"], out["c"]

    def caption_ids(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed images -> generated ids (B, max_len - 1)."""
        if len(images) == 0:
            return np.zeros((0, self.max_len - 1), np.int32)
        return decode(self.step, self.encode(images), self.max_len, self.beam_width)

    def caption(self, images_uint8: np.ndarray) -> list[str]:
        """RGB uint8 images (B, S, S, 3) at `image_size` -> one caption each."""
        return self.caption_timed(images_uint8)[0]

    def caption_timed(self, images_uint8: np.ndarray) -> tuple[list[str], float, float]:
        """`caption`, with the seconds spent encoding (preprocessing included) and decoding."""
        if len(images_uint8) == 0:
            return [], 0.0, 0.0
        t0 = time.perf_counter()
        proj = self.encode_pixels(images_uint8)
        t1 = time.perf_counter()
        ids = decode(self.step, proj, self.max_len, self.beam_width)
        captions = [self.vocab.decode(row) for row in ids]
        return captions, t1 - t0, time.perf_counter() - t1


# Bundles a worker fetched (from an object store, or shipped by the driver) are kept on its
# node under the temporary folder, one folder per manifest's sha256: every actor on the node
# loads the same copy, and a bundle whose files changed has another manifest, so another folder.
BUNDLE_CACHE = "capfleet-bundles"


def manifest_sha(bundle_dir: str | Path) -> str:
    """The sha256 of a bundle's manifest.json: the manifest lists every file's sha256, so this
    names the whole bundle's content."""
    try:
        return hashlib.sha256((place(bundle_dir) / MANIFEST_FILE).read_bytes()).hexdigest()
    except OSError as e:
        raise BundleError(f"{bundle_dir}: not a capfleet bundle (no {MANIFEST_FILE}: {e})") from e


def bundle_here(path: str, sha: str, shipped=None) -> Path:
    """The bundle as a folder on this node, with the content `sha` names (manifest_sha):
    `path` itself where this node sees it (a shared disk, the driver's node); else the node's
    cached copy; else fetched into that cache from the object store `path` names, or from
    `shipped` (an object whose `read(name)` returns a file's bytes: cluster.shipping). Every
    file fetched is checked against the manifest's sha256 before the copy is published."""
    import tempfile

    where = place(path)
    if isinstance(where, Path) and (where / MANIFEST_FILE).is_file():
        if manifest_sha(where) == sha:
            return where
    cache = Path(tempfile.gettempdir()) / BUNDLE_CACHE / sha
    if (cache / MANIFEST_FILE).is_file():
        return cache
    if isinstance(where, StorePath):
        read = lambda name: (where / name).read_bytes()  # noqa: E731
    elif shipped is not None:
        read = shipped.read
    else:
        import socket

        raise BundleError(
            f"{path}: not on this node ({socket.gethostname()}) and not shipped to it; give "
            "the bundle as an object-store URI or a folder every node sees"
        )

    def fill(tmp: Path) -> None:
        manifest_bytes = read(MANIFEST_FILE)
        if hashlib.sha256(manifest_bytes).hexdigest() != sha:
            raise BundleError(f"{path}: its manifest changed since the job started")
        (tmp / MANIFEST_FILE).write_bytes(manifest_bytes)
        for name in REQUIRED_FILES:
            (tmp / name).write_bytes(read(name))
        load_bundle_files(tmp)  # every file against the manifest's sizes and sha256

    return node_cache(cache, MANIFEST_FILE, fill)  # one fetch per node
