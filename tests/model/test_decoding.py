"""Decoding on hand-built step functions: pure numpy, no model needed."""

import numpy as np

from capfleet.model.decoding import beam_decode, decode, greedy_decode
from capfleet.model.text import END_ID, PAD_ID

V = 8


def scripted(script):
    """A step function that emits script[t] for every row at step t, PAD scored highest."""
    state = {"t": 0}

    def step(tokens, h, c, img):
        logits = np.full((len(tokens), V), -5.0, np.float32)
        logits[:, PAD_ID] = 10.0  # padding is never chosen, however it scores
        logits[:, script[min(state["t"], len(script) - 1)]] = 1.0
        state["t"] += 1
        return logits, h, c

    return step


def test_greedy_never_emits_pad_and_stops_at_end():
    ids = greedy_decode(scripted([5, 6, END_ID]), np.zeros((3, 4), np.float32), max_len=7)
    assert ids.tolist() == [[5, 6, END_ID, PAD_ID, PAD_ID, PAD_ID]] * 3


def test_empty_batches_decode_to_empty():
    empty = np.zeros((0, 4), np.float32)
    assert greedy_decode(scripted([5]), empty, 6).shape == (0, 5)
    assert beam_decode(scripted([5]), empty, 6, 3).shape == (0, 5)


def test_decode_dispatches_on_width():
    img = np.zeros((2, 4), np.float32)
    g = decode(scripted([4, END_ID]), img, 5, 1)
    b = decode(scripted([4, END_ID]), img, 5, 3)
    assert g.tolist() == b.tolist() == [[4, END_ID, PAD_ID, PAD_ID]] * 2
