"""Per-part statistics that merge: a caption job's summary adds up its parts' statistics and
never holds a Python list of every row. Each part carries its statistics in its Parquet footer
(key `capfleet.stats`), so part and statistics are written in one atomic rename.

Corpus BLEU merges exactly: nltk's corpus BLEU is a function of the summed n-gram matches and
totals and the summed hypothesis and closest-reference lengths, which is what `BleuStats` keeps.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from nltk.translate.bleu_score import brevity_penalty, closest_ref_length, modified_precision

from capfleet.model.metrics import _ZERO, BLEU_WEIGHTS

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
        for n in range(1, ORDERS + 1):
            p = modified_precision(refs, hyp, n)
            self.matches[n - 1] += p.numerator
            self.totals[n - 1] += p.denominator
        self.hyp_len += len(hyp)
        self.ref_len += closest_ref_length(refs, len(hyp))
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
        bp = brevity_penalty(self.ref_len, self.hyp_len)
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
    return stats


def merge(parts: Iterable[PartStats]) -> PartStats:
    """The sum of parts; started/finished span them."""
    total = PartStats(started=math.inf, finished=0.0)
    errors: Counter = Counter()
    for p in parts:
        total.rows += p.rows
        total.ok += p.ok
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
