"""The model bundle: a directory that captions images with ai_edge_litert alone.

    encoder.tflite       preprocessed images (B, S, S, 3) -> img_proj (B, U)
    decoder_step.tflite  (token, h, c, img_proj) -> (logits, h', c')
    vocab.json           the Vocabulary
    manifest.json        recipe, config, sizes raw and gzip, sha256 of every file, source, versions

Nothing here imports TensorFlow: a captioning process loads 60 MB of LiteRT, not 2 GB of TF.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from model.decoding import beam_decode, greedy_decode
from model.errors import CapfleetError
from model.images import preprocess
from model.text import Vocabulary

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


def file_record(path: Path) -> dict:
    """Raw size, gzip size (level 6, in memory) and sha256 of one file."""
    data = path.read_bytes()
    return {
        "bytes": len(data),
        "gzip_bytes": len(gzip.compress(data, compresslevel=6, mtime=0)),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def package_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "absent"
    return out


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON under a temporary name, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def write_bundle(
    out_dir: str | Path,
    encoder_tflite: bytes,
    decoder_tflite: bytes,
    vocab: Vocabulary,
    info: dict,
) -> dict:
    """Write a bundle; `info` (config, encoder, recipe, source...) goes into the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ENCODER_FILE).write_bytes(encoder_tflite)
    (out / DECODER_FILE).write_bytes(decoder_tflite)
    vocab.save(out / VOCAB_FILE)
    files = {n: file_record(out / n) for n in (ENCODER_FILE, DECODER_FILE, VOCAB_FILE)}
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
    """The bundle's manifest; with `verify`, every file's size and sha256 is checked."""
    d = Path(bundle_dir)
    mpath = d / MANIFEST_FILE
    if not mpath.is_file():
        raise BundleError(f"{d}: not a capfleet bundle (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({e})") from e
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{mpath}: format {manifest.get('format')!r}, expected {BUNDLE_FORMAT}")
    if verify:
        for name, want in manifest["files"].items():
            p = d / name
            if not p.is_file():
                raise BundleError(f"{d}: {name} is missing")
            data = p.read_bytes()
            if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
                raise BundleError(f"{d}: {name} does not match the manifest (changed or corrupt)")
    return manifest


class BundleRunner:
    """Captions batches of images with a bundle, on ai_edge_litert only.

    Interpreters are kept one per batch size: LiteRT's XNNPACK re-initializes on every resize.
    One BundleRunner per thread.
    """

    def __init__(self, bundle_dir: str | Path, num_threads: int = 1, beam_width: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter
        self.dir = Path(bundle_dir)
        self.manifest = read_manifest(self.dir)
        self.vocab = Vocabulary.load(self.dir / VOCAB_FILE)
        self.num_threads = num_threads
        self.beam_width = beam_width
        cfg = self.manifest["config"]
        self.max_len = int(cfg["max_len"])
        self.units = int(cfg["units"])
        enc = self.manifest["encoder"]
        self.input_size = int(enc["input_size"])
        self.preprocess_style = enc["preprocess"]
        self._models = {n: (self.dir / n).read_bytes() for n in (ENCODER_FILE, DECODER_FILE)}
        self._runners: dict[tuple[str, int], object] = {}

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
        """Preprocessed images (B, S, S, 3) float32 -> img_proj (B, U)."""
        run = self._runner(ENCODER_FILE, len(images))
        return run(image=np.ascontiguousarray(images, dtype=np.float32))["img_proj"]

    def step(self, tokens, h, c, img_proj):
        run = self._runner(DECODER_FILE, len(tokens))
        out = run(token=tokens, h=h, c=c, img_proj=img_proj)
        return out["logits"], out["h"], out["c"]

    def caption_ids(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed images -> generated ids (B, max_len - 1)."""
        img_proj = self.encode(images)
        if self.beam_width > 1:
            return beam_decode(self.step, img_proj, self.max_len, self.beam_width)
        return greedy_decode(self.step, img_proj, self.max_len)

    def caption(self, images_uint8: np.ndarray) -> list[str]:
        """RGB uint8 images (B, S, S, 3) at `image_size` -> one caption each."""
        ids = self.caption_ids(preprocess(images_uint8, self.preprocess_style))
        return [self.vocab.decode(row) for row in ids]
