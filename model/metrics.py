"""Corpus BLEU-1..4 with nltk, as the study measured it."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from nltk.translate.bleu_score import corpus_bleu

# Cumulative n-gram weights, BLEU-1 to BLEU-4 (uniform over 1..n, as nltk documents).
BLEU_WEIGHTS = {
    "bleu1": (1.0, 0.0, 0.0, 0.0),
    "bleu2": (0.5, 0.5, 0.0, 0.0),
    "bleu3": (1 / 3, 1 / 3, 1 / 3, 0.0),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}


_ZERO = 1e-100


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
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")
    if not hypotheses:
        raise ValueError("BLEU needs at least one hypothesis")
    refs = [[r.split() for r in rs] for rs in references]
    hyps = [h.split() for h in hypotheses]
    with warnings.catch_warnings():
        # nltk warns when an order has zero matches; the score 0.0 says the same thing.
        warnings.simplefilter("ignore")
        scores = {
            name: float(corpus_bleu(refs, hyps, weights=w)) for name, w in BLEU_WEIGHTS.items()
        }
    # nltk returns ~1e-155 rather than 0 when an order has no match (it avoids log(0)).
    return {name: (0.0 if v < _ZERO else v) for name, v in scores.items()}
