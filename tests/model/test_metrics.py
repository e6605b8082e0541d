import math

import pytest

from capfleet.model.metrics import corpus_bleu_scores


def test_identical_caption_scores_one():
    s = corpus_bleu_scores([["the cat sat on the mat"]], ["the cat sat on the mat"])
    assert s == pytest.approx({"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0})


def test_hand_checked_clipping_and_orders():
    # hypothesis "the cat the cat" vs reference "the cat sat":
    # unigrams: the (clip 1) + cat (clip 1) = 2 of 4 -> 0.5; the hypothesis is longer, so BP = 1.
    # bigrams: "the cat" x2 clipped to 1, "cat the" 0 -> 1 of 3; BLEU-2 = sqrt(0.5 * 1/3).
    s = corpus_bleu_scores([["the cat sat"]], ["the cat the cat"])
    assert s["bleu1"] == pytest.approx(0.5)
    assert s["bleu2"] == pytest.approx(math.sqrt(0.5 / 3))
    assert s["bleu4"] == 0.0  # no 4-gram matches and no smoothing, as the study


def test_brevity_penalty_and_multiple_references():
    # "red circle" against refs of length 3 and 5: closest ref length 3 -> BP = exp(1 - 3/2)
    s = corpus_bleu_scores([["small red circle", "a big and red circle"]], ["red circle"])
    assert s["bleu1"] == pytest.approx(math.exp(1 - 3 / 2))
    assert s["bleu2"] == pytest.approx(math.exp(1 - 3 / 2))


def test_corpus_level_not_average():
    # Corpus BLEU pools n-gram counts: 3 of 3 + 0 of 1 unigrams -> 3/4 before BP (c=4, r=4).
    s = corpus_bleu_scores([["a b c"], ["d"]], ["a b c", "x"])
    assert s["bleu1"] == pytest.approx(0.75)


def test_mismatched_lengths_refused():
    with pytest.raises(ValueError, match="2 reference sets for 1"):
        corpus_bleu_scores([["a"], ["b"]], ["a"])
