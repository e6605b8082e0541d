"""Caption text: cleaning as the original study did, the vocabulary, and id encoding."""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capfleet.core.errors import DataError
from capfleet.core.storage import place

PAD = "<pad>"  # id 0: right padding, ignored by the loss
UNK = "<unk>"  # id 1: words below the vocabulary's minimum count
START = "startseq"  # the study's start and end tokens, kept so that captions read the same
END = "endseq"
SPECIALS = (PAD, UNK, START, END)
PAD_ID, UNK_ID, START_ID, END_ID = range(4)

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def clean_caption(text: str) -> str:
    """Lower-case, strip punctuation, keep alphabetic tokens of two or more letters (the study)."""
    words = text.lower().translate(_PUNCT_TABLE).split()
    return " ".join(w for w in words if len(w) > 1 and w.isalpha())


@dataclass(frozen=True)
class Vocabulary:
    """Token <-> id mapping; ids 0..3 are PAD, UNK, START and END."""

    tokens: tuple[str, ...]
    min_count: int = 1

    def __post_init__(self) -> None:
        assert self.tokens[: len(SPECIALS)] == SPECIALS, "vocabulary must start with the specials"
        assert len(set(self.tokens)) == len(self.tokens), "vocabulary tokens must be unique"
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Vocabulary:
        """From cleaned captions: words used at least `min_count` times, most frequent first."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(w for c in captions for w in c.split())
        for special in SPECIALS:
            counts.pop(special, None)
        kept = sorted(
            (w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls(tokens=SPECIALS + tuple(kept), min_count=min_count)

    def id(self, token: str) -> int:
        """The id of a token, UNK_ID for an unknown one."""
        return self._index.get(token, UNK_ID)  # type: ignore[attr-defined]

    def encode(self, caption: str) -> list[int]:
        """A cleaned caption -> [START, ids..., END]."""
        return [START_ID] + [self.id(w) for w in caption.split()] + [END_ID]

    def encode_batch(self, captions: Iterable[str], max_len: int) -> np.ndarray:
        """Cleaned captions -> (N, max_len) int32, right-padded with PAD_ID, cut at max_len."""
        rows = [self.encode(c)[:max_len] for c in captions]
        out = np.zeros((len(rows), max_len), dtype=np.int32)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text: START skipped, stops at END or PAD."""
        words = []
        for i in ids:
            i = int(i)
            if i in (END_ID, PAD_ID):
                break
            if i != START_ID:
                words.append(self.tokens[i])
        return " ".join(words)

    def to_json(self) -> dict:
        return {
            "format": "capfleet-vocab/1",
            "min_count": self.min_count,
            "tokens": list(self.tokens),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Load a vocabulary saved with `save`; a malformed file is a DataError naming it."""
        try:
            data = place(path).read_bytes()
        except OSError as e:
            raise DataError(f"{path}: not a capfleet vocabulary ({e})") from e
        return cls.from_bytes(data, path)

    @classmethod
    def from_bytes(cls, raw: bytes, path) -> Vocabulary:
        """A vocabulary from a vocab.json's bytes (`path` names it in errors)."""
        try:
            data = json.loads(raw.decode("utf-8"))
            tokens = tuple(data["tokens"])
            if not all(isinstance(t, str) for t in tokens) or tokens[:4] != SPECIALS:
                raise ValueError("tokens must be strings starting with " + ", ".join(SPECIALS))
            return cls(tokens=tokens, min_count=int(data.get("min_count", 1)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a capfleet vocabulary ({e})") from e
