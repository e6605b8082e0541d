import math
import random

import pytest

from capfleet.core.errors import CapfleetError
from capfleet.model.metrics import (
    cider_d,
    corpus_bleu_scores,
    rouge_l,
    score_corpus,
    sentence_bleu4,
)


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


# --- CIDEr-D, ROUGE-L, sentence BLEU-4 -------------------------------------------------------


def _corpus(images: int, seed: int):
    """A corpus with the shape of a caption test split: a Zipf-ish vocabulary, 1-6 references
    per image of 3-14 words, hypotheses that copy, shuffle, cut or invent, and edge cases (an
    empty hypothesis, one word, a hypothesis equal to a reference, repeated words)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(60)] + ["a", "the", "dog", "on", "red", "in", "of"]
    weights = [1 / (i + 1) for i in range(len(vocab))]

    def sentence(lo=3, hi=14):
        return " ".join(rng.choices(vocab, weights, k=rng.randint(lo, hi)))

    refs, hyps = [], []
    for i in range(images):
        rs = [sentence() for _ in range(rng.randint(1, 6))]
        kind = i % 6
        if kind == 0:
            h = rs[0]
        elif kind == 1:
            words = rng.choice(rs).split()
            rng.shuffle(words)
            h = " ".join(words)
        elif kind == 2:
            h = " ".join(rng.choice(rs).split()[: rng.randint(1, 4)])
        else:
            h = sentence(1, 16)
        refs.append(rs)
        hyps.append(h)
    refs += [["a dog on the grass"], ["the the the"], ["one"]]
    hyps += ["", "the the the the the", "one"]
    return refs, hyps


def _coco(refs, hyps):
    gts = {str(i): list(r) for i, r in enumerate(refs)}
    res = {str(i): [h] for i, h in enumerate(hyps)}
    return gts, res


@pytest.mark.parametrize("seed", [0, 1])
def test_cider_d_equals_pycocoevalcap(seed):
    from pycocoevalcap.cider.cider import Cider

    refs, hyps = _corpus(300, seed)
    theirs, theirs_each = Cider().compute_score(*_coco(refs, hyps))
    ours, ours_each = cider_d(refs, hyps)
    assert theirs > 0.5  # a corpus with real matches, not one where every score is 0
    assert ours == pytest.approx(float(theirs), rel=1e-12, abs=1e-12)
    assert ours_each == pytest.approx([float(x) for x in theirs_each], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_rouge_l_equals_pycocoevalcap(seed):
    from pycocoevalcap.rouge.rouge import Rouge

    refs, hyps = _corpus(300, seed)
    theirs, theirs_each = Rouge().compute_score(*_coco(refs, hyps))
    ours, ours_each = rouge_l(refs, hyps)
    assert 0.1 < theirs < 0.9
    assert ours == pytest.approx(float(theirs), rel=1e-12, abs=1e-12)
    assert ours_each == pytest.approx([float(x) for x in theirs_each], rel=1e-12, abs=1e-12)


def test_cider_idf_depends_on_the_image_set():
    # The same image and caption score differently beside other images: "a" and "dog" are
    # in a second image's references in the first set (lower IDF), in no other's in the second.
    first = cider_d([["a big dog runs"], ["a dog sits"], ["birds fly"]], ["a dog runs", "x", "y"])
    second = cider_d(
        [["a big dog runs"], ["the cat sits"], ["birds fly"]], ["a dog runs", "x", "y"]
    )
    assert first[1][0] != pytest.approx(second[1][0], rel=1e-3)


def test_cider_hand_checked_two_images():
    # Two images, one reference each, hypotheses equal to them: every n-gram of image 0 that is
    # not in image 1's reference has IDF log(2); the cosine is 1 per order where the vector is
    # non-zero, 0 where every n-gram is shared (IDF 0). "x y" vs "x z": unigram x is shared
    # (weight 0), y/z not -> cosine 1; the one bigram differs -> 1; no 3/4-grams -> 0.
    # Score = 10 * (1 + 1 + 0 + 0) / 4 = 5.
    mean, each = cider_d([["x y"], ["x z"]], ["x y", "x z"])
    assert each == pytest.approx([5.0, 5.0])
    assert mean == pytest.approx(5.0)


def test_rouge_l_hand_checked():
    # LCS("a b c d", "a c d e") = 3: P = 3/4, R = 3/4 -> F = 0.75 for any beta.
    assert rouge_l([["a b c d"]], ["a c d e"])[1] == pytest.approx([0.75])
    # P = 2/2, R = 2/4: F = (1 + 1.44) * 1 * 0.5 / (0.5 + 1.44 * 1)
    assert rouge_l([["a b c d"]], ["a b"])[0] == pytest.approx(2.44 * 0.5 / 1.94)
    assert rouge_l([["a b"]], [""])[0] == 0.0


def test_sentence_bleu4_smoothed():
    assert sentence_bleu4(["the cat sat on the mat"], "the cat sat on the mat") == pytest.approx(1)
    # no 4-gram matches: unsmoothed BLEU-4 is 0, method1 gives a small positive score
    s = sentence_bleu4(["the cat sat on the mat"], "the cat the mat")
    assert 0 < s < 0.3
    assert sentence_bleu4(["a b"], "") == 0.0


def test_score_corpus_all_metrics_in_order():
    refs = [["a red circle"], ["a blue square", "blue square"]]
    corpus, each = score_corpus(refs, ["a red circle", "a green triangle"])
    assert set(corpus) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider_d", "rouge_l"}
    assert set(each) == {"cider_d", "rouge_l", "sentence_bleu4"}
    assert all(len(v) == 2 for v in each.values())
    for name in ("cider_d", "rouge_l", "sentence_bleu4"):
        assert each[name][0] > each[name][1]  # the exact caption ranks above the wrong one
    assert corpus["cider_d"] == pytest.approx(sum(each["cider_d"]) / 2)


@pytest.mark.parametrize(
    "refs, hyps, message",
    [
        ([["a"]], [], "2 reference sets|at least one|1 reference sets"),
        ([["a"], []], ["a", "b"], "image 1 has no list of reference captions"),
        (["a b"], ["a"], "image 0 has no list of reference captions"),
        ([["a"]], "a", "not one string"),
    ],
)
def test_bad_input_refused(refs, hyps, message):
    for fn in (cider_d, rouge_l, score_corpus):
        with pytest.raises(CapfleetError, match=message):
            fn(refs, hyps)
