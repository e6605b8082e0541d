"""A goal-driven compression search: which bundle to ship, given how much quality may be lost.

Instead of a fixed list of trials, a compress job with a goal ([compress.goal]) runs trials in
waves and looks at each wave's records before choosing the next:

  1. post-training quantization: fp32 (the baseline), dynamic, int8;
  2. when full int8 missed the quality bound but would otherwise beat the best recipe so far:
     mixed precision, int8 with each part's K most sensitive ops kept float (mixed-int8-K, the
     ops in their layer-sensitivity order; with fallback = "int16x8", kept in int16x8:
     mixed-int16x8-K), K = 1, 2, 4, ... until a candidate meets the goal,
     then bisection between the last K that missed and the first that met (fewer float ops:
     a smaller, faster bundle), as OpenVINO NNCF's accuracy control reverts layers in order;
     then quantization-aware training (qat-int8) on the same condition;
  3. shrinking the best recipe so far, each part alone (the decoder alone behind a frozen
     backbone): both parts at 50% in one wave, then bisection on the part that did best
     (75% or 25%, then the middle of what is left: steps of about 12 points, assuming quality
     falls as more is removed), then both parts together at the levels each reached alone;
  4. pruning, only when the goal minimizes the gzip size: a TFLite bundle's kernels stay dense,
     so pruning lowers neither the .tflite size nor the latency.

It stops when no next wave can improve the objective (or `max_trials` is reached). The choice
is the candidate meeting every bound with the lowest objective. Quality bounds are decided on
the dev split's scores (as NNCF and Intel Neural Compressor tune on a validation set); the
test split's are reported beside, never used to choose, so the winner's test scores are not
tuned to the images they are reported on. This module decides; it runs
nothing (jobs/compress/search.py runs each wave as a compress job on Ray).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

from capfleet.compression.mixed import FALLBACKS
from capfleet.compression.recipes import MIXED, TrialRecipe, parse_trial
from capfleet.compression.records import BASELINE, pareto
from capfleet.core.errors import CapfleetError, check_numbers, check_range

OBJECTIVES = {
    "latency": "e2e_ms",
    "size": "size_mb",
    "gzip_size": "gzip_mb",
    "cost": "cost_per_million",  # measured by a real caption job (jobs/compress/search.py)
}
QUALITY = {"max_delta_bleu4": "dev_bleu4", "max_delta_cider": "dev_cider_d"}  # decided on dev
PTQ_WAVE = ("fp32", "dynamic", "int8")
MAX_FLOAT_OPS = 16  # mixed precision's search stops doubling K here
SHRINK_STEP = 15  # bisection stops when the bracket is at most this many points wide


@dataclass(frozen=True)
class Goal:
    """What the chosen bundle must meet, and what it minimizes among those that do."""

    max_delta_bleu4: float | None = None  # BLEU-4 lost against fp32 at most (0.01 = a point)
    max_delta_cider: float | None = None  # CIDEr-D lost at most
    # latency (e2e ms/image) | size (MB) | gzip_size (download MB) | cost (per million images)
    minimize: str = "latency"
    max_size_mb: float | None = None
    max_ms: float | None = None  # e2e milliseconds per image at the job's bench batch
    max_trials: int = 16  # the search's budget, the baseline included
    price_per_cpu_hour: float | None = None  # minimize = "cost": what a CPU-hour costs
    images: int = 1_000_000  # minimize = "cost": the fleet's job size, for choice.md's table
    fallback: str = "float32"  # mixed precision: the sensitive ops kept float32 or int16x8

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.minimize not in OBJECTIVES:
            raise CapfleetError(
                f"minimize: must be one of {', '.join(OBJECTIVES)}, got {self.minimize!r}"
            )
        if self.max_delta_bleu4 is None and self.max_delta_cider is None:
            raise CapfleetError(
                "give max_delta_bleu4 or max_delta_cider: how much quality the bundle may lose"
            )
        for key in ("max_delta_bleu4", "max_delta_cider", "max_size_mb", "max_ms"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise CapfleetError(f"{key}: must be >= 0, got {value}")
        for key in ("max_size_mb", "max_ms"):
            if getattr(self, key) == 0:
                raise CapfleetError(f"{key}: must be > 0 (leave it out for no bound)")
        check_range(self, {"max_trials": (2, 1000), "images": (1, 10**12)})
        if self.minimize == "cost" and self.price_per_cpu_hour is None:
            raise CapfleetError('minimize = "cost" needs price_per_cpu_hour in [compress.goal]')
        if self.fallback not in FALLBACKS:
            raise CapfleetError(
                f"fallback: must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}"
            )
        if self.price_per_cpu_hour is not None and not 0 < self.price_per_cpu_hour < 10**6:
            raise CapfleetError(f"price_per_cpu_hour: must be > 0, got {self.price_per_cpu_hour}")

    @property
    def objective(self) -> str:
        """The trials column minimized."""
        return OBJECTIVES[self.minimize]

    def describe(self) -> str:
        bounds = [
            f"{key} = {getattr(self, key):g}"
            for key in ("max_delta_bleu4", "max_delta_cider", "max_size_mb", "max_ms")
            if getattr(self, key) is not None
        ]
        return f"minimize {self.minimize} with {', '.join(bounds)}"


def misses(goal: Goal, record: dict, baseline: dict) -> list[str]:
    """Why a trial's record does not meet the goal ([] when it does)."""
    if record.get("status") != "ok":
        return [f"failed: {str(record.get('error') or '').splitlines()[0][:80]}"]
    why = []
    for key, metric in QUALITY.items():
        bound = getattr(goal, key)
        if bound is None:
            continue
        mine, base = record.get(metric), baseline.get(metric)
        if mine is None or base is None:
            why.append(f"no {metric}")
        elif base - mine > bound + 1e-12:
            why.append(f"{metric} -{base - mine:.4f} > {bound:g}")
    if goal.max_size_mb is not None and record["size_mb"] > goal.max_size_mb:
        why.append(f"size {record['size_mb']:.3f} MB > {goal.max_size_mb:g}")
    if goal.max_ms is not None and record["e2e_ms"] > goal.max_ms:
        why.append(f"{record['e2e_ms']:.3f} ms > {goal.max_ms:g}")
    return why


def shortfall(goal: Goal, record: dict, baseline: dict) -> float:
    """How far a record is from meeting the goal, each bound's overshoot relative to it: the
    closest candidates of a goal nothing meets are the smallest."""
    if record.get("status") != "ok":
        return math.inf
    total = 0.0
    for key, metric in QUALITY.items():
        bound = getattr(goal, key)
        if bound is not None and record.get(metric) is not None:
            total += max(0.0, baseline[metric] - record[metric] - bound) / max(bound, 1e-3)
    for key, col in (("max_size_mb", "size_mb"), ("max_ms", "e2e_ms")):
        bound = getattr(goal, key)
        if bound is not None:
            total += max(0.0, record[col] - bound) / bound
    return total


def _with_shrink(trial: str, encoder: float, decoder: float) -> str:
    """`trial` with `encoder` and `decoder` percent of each part's units removed."""
    r = parse_trial(trial)
    enc, dec = replace(r.encoder, shrink=encoder / 100), replace(r.decoder, shrink=decoder / 100)
    return TrialRecipe(enc, dec).name


def _mixed(k: int, fallback: str = "float32") -> str:
    """int8 with each part's `k` most sensitive ops kept in `fallback` precision."""
    recipe = {v: k for k, v in MIXED.items()}[fallback]
    return parse_trial(f"{recipe}-{k}:{recipe}-{k}").name


def _with_prune(trial: str, level: int) -> str:
    r = parse_trial(trial)
    p = level / 100
    return TrialRecipe(replace(r.encoder, prune=p), replace(r.decoder, prune=p)).name


@dataclass
class Search:
    """The search's state: every record by canonical trial name, and each trial's wave."""

    goal: Goal
    frozen_encoder: bool
    records: dict[str, dict]
    waves: dict[str, str]

    @property
    def baseline(self) -> dict:
        return self.records.get(BASELINE, {})

    def meeting(self) -> list[dict]:
        base = self.baseline
        if base.get("status") != "ok":
            return []
        return [r for r in self.records.values() if not misses(self.goal, r, base)]

    def best(self) -> dict | None:
        """The candidate that meets the goal with the lowest objective (then the best BLEU-4)."""
        ok = self.meeting()
        col = self.goal.objective
        ok = [r for r in ok if r.get(col) is not None]  # a cost not (yet) measured: no choice
        return min(ok, key=lambda r: (r[col], -(r.get("dev_bleu4") or 0.0))) if ok else None

    def next_wave(self) -> tuple[str, list[str]]:
        """(what the wave is, its new trials); an empty list when the search is over."""
        budget = self.goal.max_trials - len(self.records)
        if budget <= 0:
            return "budget spent", []
        what, trials = self._next_wave()
        return what, trials[:budget]

    def _next_wave(self) -> tuple[str, list[str]]:
        todo = lambda names: [n for n in dict.fromkeys(names) if n not in self.records]  # noqa: E731
        first = todo(parse_trial(t).name for t in PTQ_WAVE)
        if first:
            return "post-training quantization", first
        if self.baseline.get("status") != "ok":
            return "the fp32 baseline failed: nothing to compare with", []
        best = self.best()
        int8 = self.records.get("int8:int8", {})
        qat = parse_trial("qat-int8").name
        int8_missed_quality = int8.get("status") == "ok" and any(
            w.split()[0] in QUALITY.values() for w in misses(self.goal, int8, self.baseline)
        )
        int8_would_win = int8_missed_quality and (best is None or self._lower(int8, best))
        if int8_would_win:
            wave = self._mixed_wave()
            if wave:
                return wave
            best = self.best()
            int8_would_win = best is None or self._lower(int8, best)
        if qat not in self.records and int8_would_win:
            return "quantization-aware training (int8 lost too much)", [qat]
        if best is None:
            return "no recipe meets the goal unshrunk: shrinking only loses more", []
        if not parse_trial(best["trial"]).decoder.prune:  # pruning comes last
            wave = self._shrink_wave(self._unshrunk(best["trial"]))
            if wave:
                return wave
        if self.goal.minimize == "gzip_size":
            for p in (50, 75):
                t = _with_prune(best["trial"], p)
                if t not in self.records:
                    return "pruning (lowers the gzip size)", [t]
                if misses(self.goal, self.records[t], self.baseline):
                    break
        return "converged", []

    def _lower(self, a: dict, b: dict) -> bool:
        """Whether `a`'s objective is below `b`'s; a cost is measured only for candidates that
        meet the goal, so where either has none, by latency (what a job's cost grows with)."""
        col = self.goal.objective
        if a.get(col) is None or b.get(col) is None:
            col = "e2e_ms"
        return a[col] < b[col]

    def _mixed_wave(self) -> tuple[str, list[str]] | None:
        """int8 with each part's K most sensitive ops float: K doubling from 1 until a
        candidate meets the goal, then bisection on K between the last miss and the first
        meet; None when that is done (or K reached MAX_FLOAT_OPS, or a mixed trial failed)."""
        mixed = lambda k: _mixed(k, self.goal.fallback)  # noqa: E731
        met, missed = [], []
        for k in range(1, MAX_FLOAT_OPS + 1):
            r = self.records.get(mixed(k))
            if r is None:
                continue
            if r.get("status") != "ok":
                return None  # the quantizer cannot build this model's mixed bundles
            (missed if misses(self.goal, r, self.baseline) else met).append(k)
        lo, hi = max(missed, default=0), min(met, default=None)
        if hi is None:
            k = 1 if lo == 0 else 2 * lo
            if k > MAX_FLOAT_OPS:
                return None
            kept = f"{k} sensitive op(s) of each part {self.goal.fallback}"
            return f"mixed precision: int8 but {kept}", [mixed(k)]
        if hi - lo > 1:
            k = (lo + hi) // 2
            return f"mixed precision bisection ({lo} ops kept missed, {hi} met)", [mixed(k)]
        return None

    def _unshrunk(self, trial: str) -> str:
        r = parse_trial(trial)
        return TrialRecipe(replace(r.encoder, shrink=0.0), replace(r.decoder, shrink=0.0)).name

    def _parts(self) -> tuple[str, ...]:
        return ("decoder",) if self.frozen_encoder else ("encoder", "decoder")

    def _shrunk(self, base: str, part: str, level: int) -> str:
        return _with_shrink(
            base, level if part == "encoder" else 0, level if part == "decoder" else 0
        )

    def _bracket(self, base: str, part: str) -> tuple[int, int]:
        """[largest level of `part` alone that met the goal, smallest that missed it]."""
        lo, hi = 0, 100
        for level in range(1, 100):
            r = self.records.get(self._shrunk(base, part, level))
            if r is not None:
                if misses(self.goal, r, self.baseline):
                    hi = min(hi, level)
                else:
                    lo = max(lo, level)
        return lo, hi

    def _best_alone(self, base: str, part: str) -> dict | None:
        """The best record (by the objective) of `part` shrunk alone that met the goal."""
        ok = [
            r
            for r in (self.records.get(self._shrunk(base, part, lv)) for lv in range(1, 100))
            if r is not None
            and not misses(self.goal, r, self.baseline)
            and r.get(self.goal.objective) is not None
        ]
        return min(ok, key=lambda r: r[self.goal.objective], default=None)

    def _shrink_wave(self, base: str) -> tuple[str, list[str]] | None:
        """Shrink each part of `base` alone: both at 50% in one wave (they run side by side),
        then bisection on the part whose shrunk bundle met the goal with the lowest objective
        (or on every part while none has), then both parts at their levels together."""
        parts, col = self._parts(), self.goal.objective
        first = [t for t in (self._shrunk(base, p, 50) for p in parts) if t not in self.records]
        if first:
            return f"shrink each part of {base} by half", first
        brackets = {p: self._bracket(base, p) for p in parts}
        met = {p: self._best_alone(base, p) for p in parts}
        leading = [p for p in parts if met[p] is not None]
        if leading:
            leading = [min(leading, key=lambda p: met[p][col])]
        wave = []
        for p in leading or parts:
            lo, hi = brackets[p]
            if hi - lo > SHRINK_STEP:
                t = self._shrunk(base, p, round((lo + hi) / 2))
                if t not in self.records:
                    wave.append(t)
        if wave:
            return f"shrink bisection on {base}", wave
        levels = {p: brackets[p][0] for p in parts}
        if len(parts) == 2 and all(levels.values()):  # both parts shrink well alone: together
            t = _with_shrink(base, levels["encoder"], levels["decoder"])
            if t not in self.records:
                return f"both parts of {base} shrunk together", [t]
        return None


def choice_document(search: Search, model: str) -> dict:
    """Every candidate with its wave and verdict, the winner and why, the Pareto front."""
    goal, base = search.goal, search.baseline
    col = goal.objective
    rows = []
    for name, r in search.records.items():
        why = misses(goal, r, base) if base.get("status") == "ok" else ["no baseline"]
        rows.append({**r, "wave": search.waves.get(name, ""), "meets": not why, "misses": why})
    best = search.best()
    ok = [
        r
        for r in rows
        if r.get("status") == "ok" and r.get("dev_bleu4") is not None and r.get(col) is not None
    ]
    front = [ok[i]["trial"] for i in pareto([(r[col], r["dev_bleu4"]) for r in ok])]
    closest = []
    if best is None:
        ranked = sorted(rows, key=lambda r: shortfall(goal, r, base))
        closest = [r["trial"] for r in ranked[:3] if r.get("status") == "ok"]
    return {
        "model": model,
        "goal": asdict(goal),
        "goal_text": goal.describe(),
        "objective": col,
        "met": best is not None,
        "winner": best["trial"] if best else None,
        "candidates": rows,
        "pareto_front": front,
        "closest": closest,
        "trials_run": len(rows),
    }


def _cell(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render_choice(doc: dict, machine: str) -> str:
    """OUT/choice.md."""
    col = doc["objective"]
    unit = {
        "e2e_ms": "ms/image",
        "size_mb": "MB",
        "gzip_mb": "MB gzip",
        "cost_per_million": "per million images",
    }[col]
    cost = col == "cost_per_million"
    lines = [f"# Choice for {doc['model']}", "", f"Goal: {doc['goal_text']}.", ""]
    rows = doc["candidates"]
    by = {r["trial"]: r for r in rows}
    if doc["met"]:
        w = by[doc["winner"]]
        n = sum(r["meets"] for r in rows)
        lines += [
            f"**Winner: `{doc['winner']}`**, copied to `best/`: the lowest {col} "
            f"({w[col]:.4g} {unit}) of the {n} candidates that meet the goal on the dev split "
            f"(dev BLEU-4 {w['dev_bleu4']:.4f} against fp32 {by[BASELINE]['dev_bleu4']:.4f}; "
            f"test BLEU-4 {_cell(w.get('bleu4'), '.4f')} against "
            f"{_cell(by[BASELINE].get('bleu4'), '.4f')}, CIDEr-D "
            f"{_cell(w.get('cider_d'), '.3f')} against "
            f"{_cell(by[BASELINE].get('cider_d'), '.3f')}; "
            f"{w['size_mb']:.3f} MB, {w['e2e_ms']:.3f} ms/image).",
            "",
        ]
    else:
        lines += [
            "**No candidate meets the goal.** The closest: "
            + ", ".join(f"`{t}` ({'; '.join(by[t]['misses'])})" for t in doc["closest"])
            + ".",
            "",
        ]
    lines += [
        f"{doc['trials_run']} trials in all. Pareto front ({col} against dev BLEU-4): "
        + ", ".join(f"`{t}`" for t in doc["pareto_front"])
        + ".",
        "",
        "| wave | trial | dev BLEU-4 | dev CIDEr-D | test BLEU-4 | test dBLEU-4 | test CIDEr-D "
        "| MB | MB gzip | ms/image (one batch) |"
        + (" job images/s | cost per million |" if cost else "")
        + " meets | why not |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cost else "") + "---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['wave']} | `{r['trial']}` | {_cell(r.get('dev_bleu4'), '.4f')} "
            f"| {_cell(r.get('dev_cider_d'), '.3f')} | {_cell(r.get('bleu4'), '.4f')} "
            f"| {_cell(r.get('delta_bleu4'), '+.4f')} | {_cell(r.get('cider_d'), '.3f')} "
            f"| {_cell(r.get('size_mb'), '.3f')} "
            f"| {_cell(r.get('gzip_mb'), '.3f')} | {_cell(r.get('e2e_ms'), '.3f')} |"
            + (
                f" {_cell(r.get('job_img_s'), '.1f')} | {_cell(r.get(col), '.4g')} |"
                if cost
                else ""
            )
            + f" {'yes' if r['meets'] else 'no'} | {'; '.join(r['misses'])} |"
        )
    if cost:
        lines += [
            "",
            "ms/image is a single-batch timing of the bundle alone; job images/s and the cost "
            "are measured by a real caption job of the bundle on the job's cluster (its own "
            "throughput, start-up excluded), at "
            f"{doc['goal']['price_per_cpu_hour']:g} per CPU-hour.",
        ]
        if doc.get("fleet"):
            lines += ["", f"The winner's fleet for {doc['goal']['images']:,} images:", ""]
            lines += doc["fleet"]
    lines += [
        "",
        "How the search works: post-training quantizations first; where int8 lost too much "
        "quality, mixed precision (the parts' most sensitive ops kept "
        f"{doc['goal'].get('fallback', 'float32')}, their number "
        "doubled until the goal is met, then bisected), then quantization-aware training; "
        "then each part of the best recipe "
        "shrunk alone, bisection on the part that did best (assuming quality falls as more "
        "units are removed) and both parts together; pruning only for "
        "the gzip size (the .tflite kernels stay dense). Every quality bound is decided on "
        "the dev split, which every trial scores the same images of; the test split's "
        "scores are reported beside and never used to choose (CIDEr-D's IDF is each image "
        f"set's own); latency with each bundle timed alone on this machine ({machine}).",
        "",
    ]
    return "\n".join(lines)


def choice_json(doc: dict) -> str:
    return json.dumps(doc, indent=1, default=str) + "\n"
