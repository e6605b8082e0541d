"""Batched caption decoding, greedy and beam search, over a step function.

Pure: token ids in, token ids out. A step function is any callable
    step(tokens (B,) int32, h (B, U), c (B, U), img_proj (B, U)) -> (logits (B, V), h', c')
so the same search runs on the Keras step graph and on a LiteRT interpreter. The batch size is
kept constant over the steps (finished rows keep being fed PAD) so that an interpreter is never
resized mid-search.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from capfleet.model.text import END_ID, PAD_ID, START_ID

StepFn = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]
]


def greedy_decode(step: StepFn, img_proj: np.ndarray, max_len: int) -> np.ndarray:
    """Greedy search for a batch.

    Args:
        step: the step function.
        img_proj: (B, U) float32 image projections.
        max_len: caption length in tokens including startseq and endseq, as in the config.
    Returns:
        (B, max_len - 1) int32 generated ids after startseq, END where a caption ended, then PAD.
    """
    b, u = img_proj.shape
    h = np.zeros((b, u), np.float32)
    c = np.zeros((b, u), np.float32)
    tokens = np.full((b,), START_ID, np.int32)
    out = np.full((b, max_len - 1), PAD_ID, np.int32)
    if b == 0:
        return out
    done = np.zeros((b,), bool)
    for t in range(max_len - 1):
        logits, h, c = step(tokens, h, c, img_proj)
        logits = np.array(logits, copy=True)
        logits[:, PAD_ID] = -np.inf  # padding is never a word
        nxt = np.argmax(logits, axis=-1).astype(np.int32)  # (B,)
        nxt[done] = PAD_ID
        out[:, t] = nxt
        done |= nxt == END_ID
        if done.all():
            break
        tokens = np.where(done, PAD_ID, nxt).astype(np.int32)
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def beam_decode(step: StepFn, img_proj: np.ndarray, max_len: int, width: int) -> np.ndarray:
    """Beam search of `width` for a batch; same output layout as `greedy_decode`.

    Scores are summed log-probabilities; a hypothesis ends at END. The search stops when every
    image's best finished hypothesis beats all of its live ones, or at max_len.
    """
    if width < 1:
        raise ValueError(f"beam width must be >= 1, got {width}")
    b, u = img_proj.shape
    k, steps = width, max_len - 1
    if b == 0:
        return np.full((0, steps), PAD_ID, np.int32)
    img = np.repeat(img_proj, k, axis=0)  # (B*k, U)
    h = np.zeros((b * k, u), np.float32)
    c = np.zeros((b * k, u), np.float32)
    tokens = np.full((b * k,), START_ID, np.int32)
    seqs = np.full((b, k, steps), PAD_ID, np.int32)
    scores = np.full((b, k), -np.inf)
    scores[:, 0] = 0.0  # all beams start identical: keep one, or the top-k fills with copies
    best_seq = np.full((b, steps), PAD_ID, np.int32)
    best_score = np.full((b,), -np.inf)
    for t in range(steps):
        logits, h, c = step(tokens, h, c, img)
        logp = _log_softmax(logits.astype(np.float64)).reshape(b, k, -1)  # (B, k, V)
        v = logp.shape[-1]
        total = scores[:, :, None] + logp  # (B, k, V)
        total[:, :, PAD_ID] = -np.inf
        flat = total.reshape(b, k * v)
        top = np.argsort(-flat, axis=1, kind="stable")[:, : 2 * k]  # k may end, k stay live
        new_seqs = np.full_like(seqs, PAD_ID)
        new_scores = np.full((b, k), -np.inf)
        parents = np.zeros((b, k), np.int64)
        new_tokens = np.full((b, k), PAD_ID, np.int32)
        for i in range(b):
            slot = 0
            for rank, j in enumerate(top[i]):
                parent, word = divmod(int(j), v)
                score = flat[i, j]
                if not np.isfinite(score):
                    break
                if word == END_ID or t == steps - 1:
                    # a hypothesis ends only when it ranks among the top k (so width 1 is
                    # exactly greedy); live ones fill the k slots from the rest
                    if rank < k and score > best_score[i]:
                        best_score[i] = score
                        best_seq[i] = seqs[i, parent]
                        best_seq[i, t] = word
                    continue
                if slot < k:
                    new_seqs[i, slot] = seqs[i, parent]
                    new_seqs[i, slot, t] = word
                    new_scores[i, slot] = score
                    parents[i, slot] = parent
                    new_tokens[i, slot] = word
                    slot += 1
        rows = (np.arange(b)[:, None] * k + parents).reshape(-1)
        h, c = h[rows], c[rows]
        seqs, scores, tokens = new_seqs, new_scores, new_tokens.reshape(-1)
        # log-probabilities only fall: a live beam can no longer beat a finished best
        if np.all(best_score >= scores.max(axis=1)):
            break
    return best_seq


def decode(step: StepFn, img_proj: np.ndarray, max_len: int, beam_width: int = 1) -> np.ndarray:
    """Greedy search for width 1, beam search above."""
    if beam_width > 1:
        return beam_decode(step, img_proj, max_len, beam_width)
    return greedy_decode(step, img_proj, max_len)


def prefix_greedy(next_logits: Callable[[np.ndarray], np.ndarray], max_len: int) -> list[int]:
    """The study's decoding of one image: re-run the whole left-padded prefix for every word.

    `next_logits((1, max_len) prefix) -> (1, V)`. Kept as the reference that batched decoding
    is tested and benchmarked against; returns the generated ids after startseq.
    """
    seq = [START_ID]
    for _ in range(max_len - 1):
        prefix = np.zeros((1, max_len), np.int32)
        prefix[0, max_len - len(seq) :] = seq
        logits = np.array(next_logits(prefix)[0], dtype=np.float64)
        logits[PAD_ID] = -np.inf
        word = int(np.argmax(logits))
        seq.append(word)
        if word == END_ID:
            break
    return seq[1:]
