"""The caption job's configuration: what to caption with which bundles, and how the job sizes
its Ray pools. The spec parser, the CLI, the pipeline's caption step and the Python API all take
their defaults from here (CAPTION_DEFAULTS).
"""

from __future__ import annotations

import glob
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from capfleet.core.errors import CapfleetError, check_at_least, check_numbers, check_range
from capfleet.core.storage import is_uri, place
from capfleet.jobs.caption.web import UrlPolicy
from capfleet.jobs.gallery import DEFAULT_GALLERY_IMAGES, check_gallery_size
from capfleet.model.bundle import read_manifest

# Upper bounds that no job needs to pass (and the outputs' int32 columns store).
CAPTION_LIMITS = {
    "batch_size": (1, 65_536),
    "shard_size": (1, 1_000_000),
    "actors": (0, 100_000),
    "beam_width": (1, 64),
    "limit": (0, 10**12),
}

# Cluster sizes (CPUs) `capfleet plan` estimates for unless told others.
PLAN_CPUS = (8, 32, 128)

_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class CaptionConfig:
    """One caption job. Validated on construction, before any work."""

    # bundle directories, or glob patterns of them ("runs/demo/compress/bundles/*/int8_int8");
    # each model's name is its manifest's name
    bundles: tuple[str, ...]
    # a folder, a Flickr8k directory, a COCO JSON, a CSV/Parquet manifest of paths or URIs
    # (local, object store, http), WebDataset tar shards, or Parquet with image bytes
    input: str
    out: str
    split: str = ""  # Flickr8k: "" = test; Karpathy JSON: "" = every image; else ignored
    references: str = ""  # a captioned data set to score against ("" = the input's own)
    address: str = ""  # "" = embedded local Ray; "auto" or "ray://host:10001"
    # Parquet input with several columns of bytes: the image's; a manifest (CSV, Parquet) of
    # paths or URLs: the column that holds them (default: path, uri or url, in any case)
    image_column: str = ""
    caption_column: str = ""  # a manifest's references (default: caption, text or captions)
    batch_size: int = 256  # images per model call
    shard_size: int = 1024  # images per output part file at most (the unit of resume)
    # Actors (each hosts every bundle); 0 = an autoscaling pool as large as the CPUs allow
    actors: int = 0
    actor_cpus: float = 1.0  # CPUs per actor (its interpreter gets as many threads, >= 1)
    # CPUs per decode task. Equal to actor_cpus, the actors fetch and decode their
    # shards themselves (one process per core reads, decodes and captions its own shards);
    # different, decoding runs as tasks of its own.
    decode_cpus: float = 1.0
    beam_width: int = 1
    max_image_mb: float = 64.0  # bytes read per image at most: larger is a too_large row
    # URLs may point at loopback and private addresses (internal image servers); False for an
    # untrusted list. Link-local and cloud-metadata addresses are always refused.
    allow_private_urls: bool = True
    max_host_rate: float = 0.0  # requests a second to one host from one worker; 0 = no bound
    # A shard whose worker dies (out of memory, a native crash) is tried this many more times;
    # a stage of a shard that runs longer than shard_timeout_s ends its worker, which counts
    # as a death. After that its rows are error rows (worker_died, timeout); a rerun retries.
    max_retries: int = 2
    shard_timeout_s: float = 3600.0
    gallery: int = DEFAULT_GALLERY_IMAGES  # images sampled into OUT/gallery.html; 0 = none
    limit: int = 0  # caption only the first N listed images (a trial run); 0 = every image
    names: tuple[str, ...] = field(default=())  # filled from the bundles' manifests

    def __post_init__(self) -> None:
        check_numbers(self)
        check_range(self, CAPTION_LIMITS)
        if isinstance(self.bundles, str):  # one bundle given as a string
            object.__setattr__(self, "bundles", (self.bundles,))
        # patterns that match nothing yet stay (a pipeline's bundles not made yet); the job
        # expands them again when it starts, strictly
        object.__setattr__(self, "bundles", expand_bundles(self.bundles, strict=False))
        if not self.bundles:
            raise CapfleetError("bundles: give at least one bundle directory")
        check_at_least(self, ("batch_size", "shard_size", "beam_width"), 1)
        check_at_least(self, ("actors",), 0)
        for key in ("actor_cpus", "decode_cpus"):
            if not 0 < getattr(self, key) <= 64:
                raise CapfleetError(f"{key}: must be in (0, 64], got {getattr(self, key)}")
        if not 0 <= self.max_host_rate <= 100_000:
            raise CapfleetError(
                f"max_host_rate: must be in [0, 100000] requests/s, got {self.max_host_rate}"
            )
        if not 0 < self.max_image_mb <= 4096:
            raise CapfleetError(f"max_image_mb: must be in (0, 4096], got {self.max_image_mb}")
        check_gallery_size(self.gallery)
        if not 0 <= self.max_retries <= 100:
            raise CapfleetError(f"max_retries: must be in [0, 100], got {self.max_retries}")
        if not 0 < self.shard_timeout_s <= 7 * 86400:
            raise CapfleetError(
                f"shard_timeout_s: must be in (0, 604800] seconds, got {self.shard_timeout_s}"
            )
        if not self.names and all(_present(b) for b in self.bundles):
            # bundles that do not exist yet (a spec loaded before its pipeline made them),
            # and bundles in an object store (a spec is checked without touching the store),
            # get their names when the job starts; run_caption_job refuses missing ones
            manifests = [read_manifest(b, verify=False) for b in self.bundles]
            object.__setattr__(self, "names", bundle_names(self.bundles, manifests))
        bad = [n for n in self.names if not n or set(n) - _NAME_OK]
        if bad:
            raise CapfleetError(f"bundle name {bad[0]!r}: use letters, digits, '.', '_', '-'")
        if len(set(self.names)) != len(self.names):
            raise CapfleetError(f"two bundles share a name: {', '.join(self.names)}")


def _present(bundle: str) -> bool:
    """A local bundle folder (one in a store is looked at when the job starts)."""
    return not is_uri(bundle) and Path(bundle).is_dir()


def bundle_names(bundles, manifests) -> tuple[str, ...]:
    """Each bundle's name: its manifest's, else its folder's."""
    return tuple(
        str(m.get("name") or place(b).name) for b, m in zip(bundles, manifests, strict=True)
    )


def expand_bundles(bundles: tuple[str, ...], strict: bool = True) -> tuple[str, ...]:
    """Glob patterns among local bundle paths expanded (sorted); a pattern that matches no
    folder is refused naming it (kept as it is when not `strict`). Other paths stay as given
    (a bundle a pipeline has yet to make is checked when the job starts)."""
    out: list[str] = []
    for b in bundles:
        if "://" in b or not any(c in b for c in "*?["):
            out.append(b)
            continue
        found = sorted(str(p) for p in glob.glob(b) if Path(p).is_dir())
        if not found and strict:
            raise CapfleetError(f"bundles: {b!r} matches no folder")
        out += found or [b]
    return tuple(out)  # a bundle given twice stays twice: refused as two of one name


def url_policy(cfg: CaptionConfig) -> UrlPolicy:
    """The job's URL policy, as its fetches and its gallery apply it."""
    return UrlPolicy(allow_private=cfg.allow_private_urls, host_rate=cfg.max_host_rate)


# Every field's default, for the CLI's flags and the pipeline's caption step.
CAPTION_DEFAULTS = {f.name: f.default for f in fields(CaptionConfig) if f.default is not MISSING}
