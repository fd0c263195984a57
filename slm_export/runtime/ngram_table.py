"""N-gram counts of a prepared data folder: drafts for prompt lookup where the row's own text
has no repeat to copy (what llama.cpp calls a static lookup cache).

A row's own history predicts little of a short story; the text a model was trained on
predicts much more of what it writes. ``NgramTable`` counts, for every 1- to
3-token context of the train split, which token follows; a draft extends the row's last
tokens one guess at a time with the longest context it knows, and stops where that
context's most frequent follower has less than ``min_share`` of its count. The target
verifies every guess, so the table changes the speed, never the output.

The contexts are keys packed in one sorted uint64 array (16 bits per token, the context
length above them), looked up with a binary search; followers and shares are arrays beside
it: a few megabytes for millions of tokens.
"""

from __future__ import annotations

import os

import numpy as np

from slm_export.data import TokenData
from slm_export.errors import SlmError

MAX_CONTEXT = 3  # tokens: 3 x 16 bits of key, and the follower's 16 bits, fit in a uint64
MAX_TOKENS = 1 << 24  # of the train split counted: bounds the build's time and memory


def _pack(windows: list[np.ndarray]) -> np.ndarray:
    """Token columns (uint64) -> one uint64 per row, the first column in the highest bits."""
    packed = windows[0].copy()
    for column in windows[1:]:
        packed <<= np.uint64(16)
        packed |= column
    return packed


def _pack_ints(tokens: list[int]) -> int:
    """``_pack`` of one row of Python ints."""
    packed = 0
    for t in tokens:
        packed = packed << 16 | int(t)  # a numpy uint16 would keep 16 bits
    return packed


class NgramTable:
    """For each context of 1 to ``max_context`` tokens seen at least ``min_count`` times in
    a token stream: its most frequent next token and that token's share of the count."""

    def __init__(self, tokens: np.ndarray, max_context: int = MAX_CONTEXT, min_count: int = 2,
                 min_share: float = 0.5):
        if not 1 <= max_context <= MAX_CONTEXT:
            raise ValueError(f"max_context must be 1 to {MAX_CONTEXT}, not {max_context}")
        self.max_context, self.min_share = max_context, min_share
        stream = np.asarray(tokens).astype(np.uint64)
        keys, followers, shares = [], [], []
        for n in range(1, max_context + 1):
            k, f, s = self._count(stream, n, min_count)
            keys.append(k | np.uint64(n << (16 * MAX_CONTEXT)))  # n-grams of each n apart
            followers.append(f)
            shares.append(s)
        self.keys = np.concatenate(keys)  # sorted: by n, then by the packed context
        self.followers = np.concatenate(followers)
        self.shares = np.concatenate(shares)

    @staticmethod
    def _count(stream: np.ndarray, n: int, min_count: int):
        """-> (packed contexts, most frequent followers, their shares) for n-token contexts."""
        count = len(stream) - n
        if count <= 0:
            empty = np.zeros(0, np.uint64)
            return empty, empty.astype(np.int64), empty.astype(np.float32)
        pairs, counts = np.unique(_pack([stream[j:j + count] for j in range(n + 1)]),
                                  return_counts=True)  # sorted by context, then follower
        contexts = pairs >> np.uint64(16)
        starts = np.flatnonzero(np.r_[True, contexts[1:] != contexts[:-1]])
        totals = np.add.reduceat(counts, starts)
        ends = np.r_[starts[1:], len(pairs)] - 1
        best = np.lexsort((counts, contexts))[ends]  # the largest count of each context
        kept = totals >= min_count
        return (contexts[starts][kept], (pairs[best] & np.uint64(0xFFFF)).astype(np.int64)[kept],
                (counts[best] / totals).astype(np.float32)[kept])

    @classmethod
    def from_data(cls, folder: str | os.PathLike, max_tokens: int = MAX_TOKENS) -> NgramTable:
        """The table of a prepared data folder's train split (its first ``max_tokens``)."""
        tokens = TokenData(folder).tokens("train")[:max_tokens]
        if len(tokens) <= MAX_CONTEXT:
            raise SlmError(f"{folder}: the train split has {len(tokens)} tokens, too few "
                           "to count n-grams")
        return cls(tokens)

    def __len__(self) -> int:
        return len(self.keys)

    def next_token(self, context: list[int]) -> int | None:
        """The follower of the longest known suffix of ``context``; None where there is none,
        or where it has less than ``min_share`` (a shorter context would guess worse)."""
        for n in range(min(self.max_context, len(context)), 0, -1):
            key = np.uint64(n << (16 * MAX_CONTEXT) | _pack_ints(context[-n:]))
            i = int(np.searchsorted(self.keys, key))
            if i < len(self.keys) and self.keys[i] == key:
                return int(self.followers[i]) if self.shares[i] >= self.min_share else None
        return None

    def draft(self, context: list[int], k: int) -> list[int]:
        """Up to ``k`` guesses continuing ``context``, each fed back as context."""
        context, out = list(context[-self.max_context:]), []
        while len(out) < k and (token := self.next_token(context)) is not None:
            out.append(token)
            context = (context + [token])[-self.max_context:]
        return out

