"""Caption metrics on cleaned, space-tokenized text: corpus BLEU-1..4 (nltk, as the study
measured it), CIDEr-D and ROUGE-L (the COCO caption evaluation's definitions, equal to
pycocoevalcap's `Cider` and `Rouge` scorers), and a smoothed sentence BLEU-4 for one caption.

METEOR and SPICE, the COCO evaluation's other two, run Java programs and are left out.

CIDEr-D weighs n-grams by their inverse document frequency over the references of the images
scored together: the same caption of the same image scores differently in another image set.
Compare CIDEr-D figures only when they were computed on one image set.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence

from capfleet.core.errors import CapfleetError

# Cumulative n-gram weights, BLEU-1 to BLEU-4 (uniform over 1..n, as nltk documents).
BLEU_WEIGHTS = {
    "bleu1": (1.0, 0.0, 0.0, 0.0),
    "bleu2": (0.5, 0.5, 0.0, 0.0),
    "bleu3": (1 / 3, 1 / 3, 1 / 3, 0.0),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}

CIDER_N, CIDER_SIGMA = 4, 6.0  # n-grams 1..4; the length penalty's Gaussian width
ROUGE_BETA = 1.2  # recall weighed 1.2x precision, as pycocoevalcap

# The corpus metrics `score_corpus` returns, and its per-image ones.
CORPUS_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider_d", "rouge_l")
PER_IMAGE_METRICS = ("cider_d", "rouge_l", "sentence_bleu4")

_ZERO = 1e-100


def nltk_bleu():
    """nltk's bleu_score module, imported when first needed: `import nltk` imports scipy.stats
    (about 1.8 s of CPU), which every caption actor and CLI command would otherwise pay at
    start-up whether it scores anything or not."""
    from nltk.translate import bleu_score

    return bleu_score


def _check(references: Sequence[Sequence[str]], hypotheses: Sequence[str], what: str) -> None:
    if isinstance(hypotheses, str):
        raise CapfleetError(f"{what}: hypotheses must be a list of captions, not one string")
    if len(references) != len(hypotheses):
        raise CapfleetError(
            f"{what}: {len(references)} reference sets for {len(hypotheses)} hypotheses"
        )
    if not hypotheses:
        raise CapfleetError(f"{what} needs at least one hypothesis")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise CapfleetError(
                f"{what}: image {i} has no list of reference captions (got {refs!r})"
            )


def corpus_bleu_scores(
    references: Sequence[Sequence[str]], hypotheses: Sequence[str]
) -> dict[str, float]:
    """Corpus BLEU-1..4.

    Args:
        references: per hypothesis, its reference captions (cleaned text).
        hypotheses: one generated caption (cleaned text) per image.
    Returns:
        {"bleu1": ..., "bleu4": ...}; 0.0 where an order has no matching n-gram (no smoothing).
    """
    _check(references, hypotheses, "BLEU")
    refs = [[r.split() for r in rs] for rs in references]
    hyps = [h.split() for h in hypotheses]
    with warnings.catch_warnings():
        # nltk warns when an order has zero matches; the score 0.0 says the same thing.
        warnings.simplefilter("ignore")
        scores = {
            name: float(nltk_bleu().corpus_bleu(refs, hyps, weights=w))
            for name, w in BLEU_WEIGHTS.items()
        }
    # nltk returns ~1e-155 rather than 0 when an order has no match (it avoids log(0)).
    return {name: (0.0 if v < _ZERO else v) for name, v in scores.items()}


def sentence_bleu4(references: Sequence[str], hypothesis: str) -> float:
    """BLEU-4 of one caption against its references, smoothed with nltk's
    SmoothingFunction().method1 (an order with no match counts 0.1 matches instead of 0), so a
    short or poor caption gets a small positive score rather than 0. For ranking captions;
    report corpus BLEU."""
    if isinstance(references, str) or not references:
        raise CapfleetError(f"sentence BLEU-4: no list of reference captions (got {references!r})")
    hyp = hypothesis.split()
    if not hyp:
        return 0.0
    bleu = nltk_bleu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            bleu.sentence_bleu(
                [r.split() for r in references],
                hyp,
                weights=BLEU_WEIGHTS["bleu4"],
                smoothing_function=bleu.SmoothingFunction().method1,
            )
        )


def _ngrams(words: list[str]) -> Counter:
    return Counter(
        tuple(words[i : i + k]) for k in range(1, CIDER_N + 1) for i in range(len(words) - k + 1)
    )


def cider_d(
    references: Sequence[Sequence[str]], hypotheses: Sequence[str]
) -> tuple[float, list[float]]:
    """CIDEr-D (Vedantam et al. 2015, as pycocoevalcap's `Cider` computes it): the corpus score
    (the mean) and each image's score.

    The n-grams' IDF comes from the references of exactly these images (see the module's
    note): a score compares only with scores of the same image set. Ranges 0..10 in principle;
    good captioners score about 1 on COCO."""
    _check(references, hypotheses, "CIDEr-D")
    refs = [[_ngrams(r.split()) for r in rs] for rs in references]
    hyps = [_ngrams(h.split()) for h in hypotheses]
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for g in r})
    log_images = math.log(float(len(refs)))

    def vector(counts: Counter):
        vec = [{} for _ in range(CIDER_N)]
        norm = [0.0] * CIDER_N
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            v = float(tf) * (log_images - math.log(max(1.0, df[gram])))
            vec[n][gram] = v
            norm[n] += v * v
            # pycocoevalcap counts bigrams as the "length" of its length penalty (n == 1
            # there is the second order); kept for equal scores.
            if n == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    per_image = []
    for hyp, rs in zip(hyps, refs, strict=True):
        vh, nh, lh = vector(hyp)
        total = [0.0] * CIDER_N
        for r in rs:
            vr, nr, lr = vector(r)
            penalty = math.e ** (-(float(lh - lr) ** 2) / (2 * CIDER_SIGMA**2))
            for n in range(CIDER_N):
                val = sum(min(v, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, v in vh[n].items())
                if nh[n] != 0 and nr[n] != 0:
                    val /= nh[n] * nr[n]
                total[n] += val * penalty
        per_image.append(sum(total) / CIDER_N / len(rs) * 10.0)
    return sum(per_image) / len(per_image), per_image


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (one row of the table)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(
    references: Sequence[Sequence[str]], hypotheses: Sequence[str]
) -> tuple[float, list[float]]:
    """ROUGE-L (as pycocoevalcap's `Rouge`): per image, the F-measure (beta 1.2) of the best
    LCS precision and the best LCS recall over its references; the corpus score is the mean."""
    _check(references, hypotheses, "ROUGE-L")
    per_image = []
    for rs, h in zip(references, hypotheses, strict=True):
        cand = h.split()
        if not cand:
            per_image.append(0.0)
            continue
        prec, rec = [], []
        for r in rs:
            ref = r.split()
            lcs = _lcs(ref, cand)
            prec.append(lcs / float(len(cand)))
            rec.append(lcs / float(len(ref)) if ref else 0.0)
        p, r_ = max(prec), max(rec)
        b2 = ROUGE_BETA**2
        per_image.append(((1 + b2) * p * r_) / float(r_ + b2 * p) if p and r_ else 0.0)
    return sum(per_image) / len(per_image), per_image


def score_corpus(
    references: Sequence[Sequence[str]], hypotheses: Sequence[str]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Every metric at once: the corpus scores (CORPUS_METRICS: BLEU-1..4, CIDEr-D, ROUGE-L)
    and the per-image ones (PER_IMAGE_METRICS: CIDEr-D, ROUGE-L, smoothed sentence BLEU-4),
    lists in the order of `hypotheses`. CIDEr-D's IDF is that of these images' references."""
    corpus = corpus_bleu_scores(references, hypotheses)
    corpus["cider_d"], cider_each = cider_d(references, hypotheses)
    corpus["rouge_l"], rouge_each = rouge_l(references, hypotheses)
    per_image = {
        "cider_d": cider_each,
        "rouge_l": rouge_each,
        "sentence_bleu4": [
            sentence_bleu4(r, h) for r, h in zip(references, hypotheses, strict=True)
        ],
    }
    return corpus, per_image
