"""The goal search's decisions, wave by wave, on records of a model whose response to each
recipe is known (quality lost grows with the shrink level; int8 costs a known amount)."""

import pytest

from capfleet.compression.goal import Goal, Search, choice_document, misses, render_choice
from capfleet.compression.recipes import parse_trial
from capfleet.core.errors import CapfleetError


def measured(trial: str, int8_loss: float = 0.004, qat_loss: float = 0.002) -> dict:
    """A record for `trial`: BLEU-4 falls 0.0004 per shrink point past 20%, int8 (PTQ) loses
    int8_loss, QAT qat_loss, mixed-int8-K int8_loss less a quarter of it per float op (none
    from 4 on); latency falls with int8 and with shrinking, less with each float op."""
    r = parse_trial(trial)
    enc, dec = r.encoder, r.decoder
    loss = max(0.0, (dec.shrink * 100 - 20) * 0.0004)
    ms = 1.0 * (1 - enc.shrink) ** 2 + 0.5 * (1 - dec.shrink)
    if enc.quant == "int8":
        ms *= 0.6
    if dec.quant == "int8":
        loss += int8_loss
        ms *= 0.9
    if dec.quant == "qat-int8":
        loss += qat_loss
        ms *= 0.9
    if dec.quant == "dynamic":
        loss += 0.001
    if dec.quant in ("mixed-int8", "mixed-int16x8"):
        k = dec.keep_float or 2
        loss += int8_loss * max(0.0, 1 - k / 4)
        ms *= 0.9 + 0.025 * min(k, 4)
    if enc.quant in ("mixed-int8", "mixed-int16x8"):
        ms *= 0.6 + 0.05 * min(enc.keep_float or 2, 8)
    size = 0.8 * (1 - dec.shrink) * (0.25 if dec.quant != "fp32" else 1.0)
    return {
        "model": "m",
        "trial": r.name,
        "status": "ok",
        "bleu4": 0.90 - loss,
        "cider_d": 2.0 - 10 * loss,
        "dev_bleu4": 0.88 - loss,  # the dev split's images score lower; the loss is the same
        "dev_cider_d": 1.9 - 10 * loss,
        "e2e_ms": ms,
        "size_mb": size,
        "gzip_mb": size * 0.9 * (1 - max(enc.prune, dec.prune) / 2),
    }


def search(goal: Goal, frozen: bool = False, **kw) -> tuple[Search, list[tuple[str, list]]]:
    s = Search(goal, frozen, {}, {})
    waves = []
    while True:
        what, trials = s.next_wave()
        if not trials:
            return s, waves
        waves.append((what, trials))
        for t in trials:
            s.records[t] = measured(t, **kw)
            s.waves[t] = what


def test_quantizes_then_shrinks_each_part_and_bisects_the_one_that_does_best():
    s, waves = search(Goal(max_delta_bleu4=0.01))
    assert waves[0] == ("post-training quantization", ["fp32:fp32", "dynamic:dynamic", "int8:int8"])
    # both parts halved alone, side by side; the decoder's half loses too much (0.012 + int8's
    # 0.004), the encoder's costs nothing and is faster: bisect it, 75 then 88
    assert waves[1] == (
        "shrink each part of int8:int8 by half",
        ["shrink-50+int8:int8", "int8:shrink-50+int8"],
    )
    assert [ts for _, ts in waves[2:]] == [["shrink-75+int8:int8"], ["shrink-88+int8:int8"]]
    assert s.best()["trial"] == "shrink-88+int8:int8"
    assert len(s.records) == 7  # fewer than a grid of every level


def test_parts_that_both_shrink_well_alone_are_then_shrunk_together():
    s, waves = search(Goal(max_delta_bleu4=1.0))  # every candidate meets it
    assert waves[-1] == (
        "both parts of int8:int8 shrunk together",
        ["shrink-88+int8:shrink-50+int8"],
    )
    assert s.best()["trial"] == "shrink-88+int8:shrink-50+int8"


def test_int8_that_loses_too_much_gets_mixed_precision_then_quantization_aware_training():
    s, waves = search(Goal(max_delta_bleu4=0.005), int8_loss=0.008, qat_loss=0.001)
    # int8 lost 0.008: one float op per part recovers a quarter (0.006, missed), two half
    # (0.004, met); 1 missed and 2 met leave nothing to bisect
    assert waves[1] == (
        "mixed precision: int8 but 1 sensitive op(s) of each part float32",
        ["mixed-int8-1:mixed-int8-1"],
    )
    assert waves[2][1] == ["mixed-int8-2:mixed-int8-2"]
    assert s.waves["mixed-int8-2:mixed-int8-2"].startswith("mixed precision")
    # QAT's int8 would still beat the mixed bundle: it is tried, meets the goal, then shrunk
    assert waves[3] == ("quantization-aware training (int8 lost too much)", ["int8:qat-int8"])
    assert s.best()["trial"].endswith("qat-int8")


def test_mixed_precision_doubles_then_bisects_the_float_ops_and_keeps_them_when_shrunk():
    # int8 loses 0.016: K float ops leave 0.016 (1 - K/4); the bound 0.005 needs K >= 3
    s, waves = search(Goal(max_delta_bleu4=0.005), int8_loss=0.016, qat_loss=0.02)
    mixed = [ts[0] for what, ts in waves if what.startswith("mixed precision")]
    assert mixed == [f"mixed-int8-{k}:mixed-int8-{k}" for k in (1, 2, 4, 3)]
    assert [w for w, _ in waves if w.startswith("mixed precision bisection")] == [
        "mixed precision bisection (2 ops kept missed, 4 met)"
    ]
    assert misses(s.goal, s.records["int8:qat-int8"], s.baseline)  # QAT tried, lost more
    best = s.best()["trial"]
    assert "mixed-int8-3" in best  # the fewest float ops that met, shrunk from there
    assert all("mixed-int8-3" in t for t in s.records if "shrink" in t)


def test_an_int16x8_fallback_keeps_the_sensitive_ops_in_int16x8():
    goal = Goal(max_delta_bleu4=0.005, fallback="int16x8")
    s, waves = search(goal, int8_loss=0.016, qat_loss=0.02)
    mixed = [ts[0] for what, ts in waves if what.startswith("mixed precision")]
    assert mixed == [f"mixed-int16x8-{k}:mixed-int16x8-{k}" for k in (1, 2, 4, 3)]
    assert waves[1][0] == "mixed precision: int8 but 1 sensitive op(s) of each part int16x8"
    assert "kept int16x8" in render_choice(choice_document(s, "m"), "cpu")
    with pytest.raises(CapfleetError, match="fallback: must be one of float32, int16x8"):
        Goal(max_delta_bleu4=0.01, fallback="int4")


def test_a_frozen_backbone_is_never_shrunk_and_size_goals_skip_pruning_unless_gzip():
    s, _ = search(Goal(max_delta_bleu4=0.01, minimize="size"), frozen=True)
    assert all(not parse_trial(t).encoder.shrink for t in s.records)
    assert not any(parse_trial(t).decoder.prune for t in s.records)
    g, waves = search(Goal(max_delta_bleu4=0.01, minimize="gzip_size"))
    assert waves[-1][0] == "pruning (lowers the gzip size)"
    assert any(parse_trial(t).decoder.prune for t in g.records)


def test_a_goal_nothing_meets_names_the_closest_and_why():
    s, _ = search(Goal(max_delta_bleu4=0.01, max_ms=0.01))
    assert s.best() is None
    doc = choice_document(s, "m")
    assert not doc["met"] and doc["winner"] is None and len(doc["closest"]) == 3
    text = render_choice(doc, "test cpu")
    assert "No candidate meets the goal" in text and "ms > 0.01" in text
    # a budget bounds the search
    small, _ = search(Goal(max_delta_bleu4=0.01, max_trials=4))
    assert len(small.records) == 4


def test_the_goal_is_decided_on_dev_and_test_is_only_reported():
    s = Search(Goal(max_delta_bleu4=0.01), False, {}, {})
    for t in ("fp32:fp32", "dynamic:dynamic", "int8:int8"):
        s.records[t] = measured(t)
    # int8 looks fine on the test split but lost too much on dev: it does not meet the goal
    s.records["int8:int8"].update(bleu4=0.90, dev_bleu4=0.80)
    assert misses(s.goal, s.records["int8:int8"], s.baseline) == ["dev_bleu4 -0.0800 > 0.01"]
    assert s.best()["trial"] == "fp32:fp32"  # as fast as dynamic here, better on dev
    text = render_choice(choice_document(s, "m"), "test cpu")
    assert "meet the goal on the dev split" in text and "test BLEU-4 0.9000" in text
    assert "never used to choose" in text


def test_a_cost_goal_picks_the_lowest_measured_cost_not_the_fastest_batch():
    s = Search(Goal(max_delta_bleu4=0.01, minimize="cost", price_per_cpu_hour=0.05), False, {}, {})
    for t in ("fp32:fp32", "dynamic:dynamic", "int8:int8"):
        s.records[t] = measured(t)
    assert s.best() is None  # meeting the bounds is not enough: no cost measured yet
    # int8 is the fastest single batch, but its caption job is the slowest (as on CPUs
    # without int8 instructions): the measured cost decides
    s.records["fp32:fp32"].update(cost_per_million=0.9, job_img_s=150.0)
    s.records["dynamic:dynamic"].update(cost_per_million=1.1, job_img_s=120.0)
    s.records["int8:int8"].update(cost_per_million=1.4, job_img_s=95.0)
    assert s.records["int8:int8"]["e2e_ms"] < s.records["fp32:fp32"]["e2e_ms"]
    assert s.best()["trial"] == "fp32:fp32"
    doc = choice_document(s, "m")
    doc["fleet"] = ["| CPUs | wall |", "|---|---|", "| 8 | 1 h |"]
    text = render_choice(doc, "test cpu")
    assert "| job images/s | cost per million |" in text and "| 150.0 | 0.9 |" in text
    assert "single-batch timing" in text and "The winner's fleet for 1,000,000 images" in text
    with pytest.raises(CapfleetError, match="price_per_cpu_hour"):
        Goal(max_delta_bleu4=0.01, minimize="cost")


def test_misses_says_which_bound_and_by_how_much():
    base = measured("fp32")
    worse = {**measured("int8"), "dev_bleu4": base["dev_bleu4"] - 0.02}
    assert misses(Goal(max_delta_bleu4=0.01), worse, base) == ["dev_bleu4 -0.0200 > 0.01"]
    assert misses(Goal(max_delta_bleu4=0.03), worse, base) == []
    assert misses(Goal(max_delta_cider=0.0), measured("int8"), base)[0].startswith("dev_cider_d")
    failed = {"trial": "int8:int8", "status": "error", "error": "boom\nmore"}
    assert misses(Goal(max_delta_bleu4=0.01), failed, base) == ["failed: boom"]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({}, "max_delta_bleu4 or max_delta_cider"),
        ({"max_delta_bleu4": float("nan")}, "max_delta_bleu4"),
        ({"max_delta_bleu4": -0.1}, "must be >= 0"),
        ({"max_delta_bleu4": 0.01, "minimize": "speed"}, "minimize"),
        ({"max_delta_bleu4": 0.01, "max_ms": 0.0}, "max_ms"),
        ({"max_delta_bleu4": 0.01, "max_trials": 1}, "max_trials"),
    ],
)
def test_bad_goals_are_refused_naming_the_key(kw, message):
    with pytest.raises(CapfleetError, match=message):
        Goal(**kw)
