"""A caption job's parts: the output schemas (declared once), the per-part statistics that
merge, where parts go, the resume plan that makes reruns sound, and reading the parts back.

A part is written atomically (capfleet.core.artifacts) with its statistics in its Parquet
footer (key `capfleet.stats`), so a part that exists and reads is whole; one that does not read
is redone. A job's summary adds up its parts' statistics and never holds a Python list of every
row. Corpus BLEU merges exactly: nltk's corpus BLEU is a function of the summed n-gram matches
and totals and the summed hypothesis and closest-reference lengths, which is what `BleuStats`
keeps.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfleet.core.artifacts import write_bytes_atomic, write_json_atomic
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import StorePath, parquet_metadata, place, read_parquet
from capfleet.model.metrics import _ZERO, BLEU_WEIGHTS, nltk_bleu

# One row per (image, model).
CAPTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("model", pa.string()),
        ("caption", pa.string()),  # null when status is "error"
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),  # reason, e.g. "truncated: image file is truncated"; null when ok
        ("references", pa.list_(pa.string())),  # the image's reference captions (empty: none)
        ("rouge_l", pa.float64()),  # per-image scores against the references; null without
        ("sentence_bleu4", pa.float64()),  # (smoothed: nltk's method1)
        # encoder_ms + decoder_ms: the batch's model time divided by its size (a batch mean)
        ("latency_ms", pa.float64()),
        ("read_ms", pa.float64()),  # fetching the bytes (a tar's or row group's share)
        ("decode_ms", pa.float64()),  # decoding and resizing for every input size
        ("encoder_ms", pa.float64()),  # the batch's encoder time divided by its size
        ("decoder_ms", pa.float64()),  # the batch's decoding time divided by its size
        ("batch_size", pa.int32()),
        ("worker", pa.string()),  # host:pid of the actor that captioned it
        ("shard", pa.int32()),
    ]
)

# One row per model.
SUMMARY_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("images", pa.int64()),
        ("ok", pa.int64()),
        ("failed", pa.int64()),
        ("errors", pa.string()),  # JSON {reason: count} of the failed rows
        # images this run captioned / this model's own time, first part begun to last finished
        ("throughput_img_s", pa.float64()),
        ("actor_img_s", pa.float64()),  # images per second of one busy actor (this run)
        # over the model's calls (batches), each counted once: the call's encoder + decoder
        # time per image (the rows' latency_ms, which the images of one call share)
        ("latency_p50_ms", pa.float64()),
        ("latency_p95_ms", pa.float64()),
        ("read_ms", pa.float64()),  # means per ok image
        ("decode_ms", pa.float64()),
        ("encoder_ms", pa.float64()),
        ("decoder_ms", pa.float64()),
        ("e2e_ms", pa.float64()),  # read + decode + encoder + decoder: one image end to end
        ("size_mb", pa.float64()),
        ("gzip_size_mb", pa.float64()),
        ("scored", pa.int64()),  # ok images with references, which the scores are computed on
        ("bleu1", pa.float64()),  # null without references
        ("bleu2", pa.float64()),
        ("bleu3", pa.float64()),
        ("bleu4", pa.float64()),
        # CIDEr-D's IDF is that of this job's scored images: compare models on one image set;
        # null without references, or above CIDER_MAX_IMAGES scored images (see summary.py)
        ("cider_d", pa.float64()),
        ("rouge_l", pa.float64()),  # the mean of the rows' rouge_l
    ]
)

OK, ERROR = "ok", "error"
STATS_KEY = b"capfleet.stats"  # a part's PartStats, JSON, in its Parquet footer


ORDERS = 4
TIMINGS = ("latency_ms", "read_ms", "decode_ms", "encoder_ms", "decoder_ms")  # summed, ok rows


@dataclass
class BleuStats:
    """The sums corpus BLEU-1..4 is computed from."""

    matches: list[int] = field(default_factory=lambda: [0] * ORDERS)
    totals: list[int] = field(default_factory=lambda: [0] * ORDERS)
    hyp_len: int = 0
    ref_len: int = 0
    scored: int = 0  # captions scored

    def add(self, references: Sequence[str], hypothesis: str) -> None:
        """One caption (cleaned text) against its references (cleaned text)."""
        refs = [r.split() for r in references]
        hyp = hypothesis.split()
        bleu = nltk_bleu()
        for n in range(1, ORDERS + 1):
            p = bleu.modified_precision(refs, hyp, n)
            self.matches[n - 1] += p.numerator
            self.totals[n - 1] += p.denominator
        self.hyp_len += len(hyp)
        self.ref_len += bleu.closest_ref_length(refs, len(hyp))
        self.scored += 1

    def merge(self, other: BleuStats) -> None:
        for n in range(ORDERS):
            self.matches[n] += other.matches[n]
            self.totals[n] += other.totals[n]
        self.hyp_len += other.hyp_len
        self.ref_len += other.ref_len
        self.scored += other.scored

    def scores(self) -> dict[str, float | None]:
        """BLEU-1..4 as capfleet.model.metrics.corpus_bleu_scores gives them (None unscored)."""
        if not self.scored:
            return {name: None for name in BLEU_WEIGHTS}
        if self.matches[0] == 0:
            return {name: 0.0 for name in BLEU_WEIGHTS}
        bp = nltk_bleu().brevity_penalty(self.ref_len, self.hyp_len)
        p_n = [
            Fraction(m, t, _normalize=False) for m, t in zip(self.matches, self.totals, strict=True)
        ]
        p_n = [p if p.numerator else sys.float_info.min for p in p_n]  # nltk's method0
        out = {}
        for name, weights in BLEU_WEIGHTS.items():
            s = bp * math.exp(
                math.fsum(w * math.log(p) for w, p in zip(weights, p_n, strict=True) if p > 0)
            )
            out[name] = 0.0 if s < _ZERO else s
        return out


@dataclass
class PartStats:
    """What one part (a shard's rows for one model) contributes to the summary."""

    rows: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # by reason (before the ':')
    latency_ms: float = 0.0  # sums over ok rows...
    read_ms: float = 0.0
    decode_ms: float = 0.0
    encoder_ms: float = 0.0
    decoder_ms: float = 0.0
    started: float = 0.0  # Unix time the worker began and ended this part
    finished: float = 0.0
    busy_s: float = 0.0  # finished - started, summed over merged parts
    retry: bool = False  # the driver wrote these rows for a shard whose worker failed: redo it
    bleu: BleuStats = field(default_factory=BleuStats)
    rouge_l: float = 0.0  # summed over the scored rows
    # rows this part's write captioned ok: all its ok rows when written whole, the repaired
    # ones when --retry-errors redid some (-1: a part written before this was kept: its rows)
    captioned: int = -1

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> PartStats:
        return cls(**{**doc, "bleu": BleuStats(**doc.get("bleu", {}))})


def stats_of(table, started: float, finished: float) -> PartStats:
    """A part's statistics from its rows (pyarrow Table of CAPTION_SCHEMA)."""
    from capfleet.model.text import clean_caption

    stats = PartStats(rows=table.num_rows, started=started, finished=finished)
    errors: Counter = Counter()
    for r in table.select(
        ["status", "error", "caption", "references", "rouge_l", *TIMINGS]
    ).to_pylist():
        if r["status"] != "ok":
            errors[reason(r["error"] or "")] += 1
            continue
        stats.ok += 1
        for key in TIMINGS:
            setattr(stats, key, getattr(stats, key) + (r[key] or 0.0))
        if r["references"]:
            stats.bleu.add([clean_caption(c) for c in r["references"]], r["caption"])
            stats.rouge_l += r["rouge_l"] or 0.0
    stats.errors = dict(errors)
    stats.captioned = stats.ok
    return stats


def merge(parts: Iterable[PartStats]) -> PartStats:
    """The sum of parts; started/finished span them."""
    total = PartStats(started=math.inf, finished=0.0, captioned=0)
    errors: Counter = Counter()
    for p in parts:
        total.rows += p.rows
        total.ok += p.ok
        total.captioned += p.captioned if p.captioned >= 0 else p.rows
        errors.update(p.errors)
        for key in TIMINGS:
            setattr(total, key, getattr(total, key) + getattr(p, key))
        total.busy_s += p.busy_s or (p.finished - p.started)
        total.started = min(total.started, p.started)
        total.finished = max(total.finished, p.finished)
        total.bleu.merge(p.bleu)
        total.rouge_l += p.rouge_l
    total.errors = dict(errors)
    if total.started == math.inf:
        total.started = 0.0
    return total


def reason(error: str) -> str:
    """The stable reason of an error text: "truncated: image file is ..." -> "truncated"."""
    return error.split(":", 1)[0]


PLAN_FILE = "plan.json"


class PlanMismatch(CapfleetError):
    """An output folder was written from other inputs, bundles or settings than this run's."""


PLAN_FORMAT = "capfleet-caption-plan/2"


def bundle_identity(manifest: dict) -> str:
    """What of a bundle changes its captions: every file's sha256 (encoder, decoder step,
    vocabulary), the encoder section (input size, preprocessing) and the captioner config."""
    doc = {
        "files": {n: f.get("sha256") for n, f in sorted(manifest.get("files", {}).items())},
        "encoder": manifest.get("encoder"),
        "config": manifest.get("config"),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def check_plan(out: str | Path, plan: dict) -> None:
    """Resume is by part files, so it is only sound for the same cut of the same inputs into
    the same models. The first run writes OUT/plan.json; a rerun that differs in anything is
    refused naming it, except that new bundle names may be added."""
    path = place(out) / PLAN_FILE
    plan = {"format": PLAN_FORMAT, **plan}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            assert isinstance(old, dict) and isinstance(old.get("bundles"), dict)
        except (ValueError, AssertionError, UnicodeDecodeError) as e:
            raise CapfleetError(
                f"{path}: unreadable ({type(e).__name__}); it records what this output was "
                "made from: restore it, or caption into a new --out"
            ) from None
        if old.get("format") != PLAN_FORMAT:
            raise PlanMismatch(
                f"{out}: written by another capfleet version ({old.get('format', 'plan/1')}); "
                "caption into a new --out"
            )
        for key, value in plan.items():
            if key == "bundles":
                changed = [n for n, ident in value.items() if old["bundles"].get(n, ident) != ident]
                if changed:
                    raise PlanMismatch(
                        f"{out}: bundle {changed[0]!r} differs from the one that wrote this "
                        "output (its files, vocabulary or encoder); use a new --out or a new "
                        "bundle name"
                    )
            elif old.get(key) != value:
                raise PlanMismatch(
                    f"{out}: was written with a different {key} ({old.get(key)} vs {value}); "
                    "resume needs the same inputs, shard size and beam width, or use a new --out"
                )
        plan["bundles"] = {**old["bundles"], **plan["bundles"]}
    write_json_atomic(path, plan)


# OUT/captions/NAME/part-NNNNNN.parquet: plain folders, not hive's `model=NAME`, whose key
# pandas, pyarrow and Spark read as a dictionary column that clashes with the `model` column
# every part holds, so the whole folder did not load in one call.
CAPTIONS_DIR = "captions"


def part_path(out: str | Path, model: str, shard: int) -> Path:
    return place(out) / CAPTIONS_DIR / model / f"part-{shard:06d}.parquet"


def upgrade_layout(out: str | Path) -> int:
    """Move an earlier version's OUT/captions/model=NAME folders to OUT/captions/NAME, so that
    a rerun resumes them; returns how many moved."""
    moved = 0
    if isinstance(place(out), StorePath):
        return 0  # the earlier layout was never written to an object store
    for old in sorted((Path(out) / CAPTIONS_DIR).glob("model=*")):
        new = old.with_name(old.name.removeprefix("model="))
        if old.is_dir() and not new.exists():
            old.rename(new)
            moved += 1
    return moved


def write_part(path: Path, table: pa.Table, stats: PartStats) -> None:
    """A part and its statistics, whole or not at all."""
    meta = {**(table.schema.metadata or {}), STATS_KEY: json.dumps(stats.to_json()).encode()}
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(meta), sink)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


def part_stats(path: Path) -> PartStats | None:
    """A part's statistics from its footer; None when the part is absent or does not read
    (0 bytes, truncated, no footer): such a part is not done."""
    try:
        meta = parquet_metadata(path).metadata or {}
        return PartStats.from_json(json.loads(meta[STATS_KEY]))
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
        return None


def part_done(path: Path) -> bool:
    """A part that reads whole and holds captioned rows (not a failed shard's stand-in)."""
    stats = part_stats(path)
    return stats is not None and not stats.retry


def failed_part(shard, model: str, error: str) -> tuple[pa.Table, PartStats]:
    """The rows of a shard whose worker failed (died, or timed out) after its retries: every
    row an error with the reason, so the outputs say what happened to each image; a rerun
    redoes the shard (its statistics say `retry`)."""
    import time

    n = len(shard.image_id)
    table = pa.table(
        {
            "image_id": shard.image_id,
            "uri": shard.uri,
            "model": [model] * n,
            "caption": [None] * n,
            "status": ["error"] * n,
            "error": [error] * n,
            "references": shard.references,
            "shard": [shard.shard] * n,
        }
    )
    table = pa.table(
        {
            f.name: table[f.name] if f.name in table.column_names else pa.nulls(n, f.type)
            for f in CAPTION_SCHEMA
        },
        schema=CAPTION_SCHEMA,
    )
    now = time.time()
    reason = error.split(":", 1)[0]
    return table, PartStats(rows=n, errors={reason: n}, started=now, finished=now, retry=True)


def parts(out: str | Path, model: str) -> Iterator[Path]:
    yield from sorted((place(out) / CAPTIONS_DIR / model).glob("part-*.parquet"))


def read_captions(out: str | Path, model: str | None = None, columns=None) -> pa.Table:
    """Every caption row written so far (all models, or one), of parts that read whole (a
    failed shard's error rows included)."""
    root = place(out) / CAPTIONS_DIR
    pattern = f"{model}/part-*.parquet" if model else "*/part-*.parquet"
    found = [
        p
        for p in sorted(root.glob(pattern))
        if not p.parent.name.startswith("model=")  # an earlier layout's, not moved (a clash)
        and part_stats(p) is not None
    ]
    schema = (
        CAPTION_SCHEMA if columns is None else pa.schema([CAPTION_SCHEMA.field(c) for c in columns])
    )
    if not found:
        return schema.empty_table()
    return pa.concat_tables(read_parquet(p, columns=columns).cast(schema) for p in found)
