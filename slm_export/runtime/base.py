"""The runtime contract: one small interface, implemented once per backend.

A backend turns token ids into logits; everything else (sampling, stop rules, context
overflow, streaming, batching, speculation) lives in ``generation.py`` and is written once.

- ``prefill(ids, attention_mask)``: ids (B, T) int64, attention_mask (B, T) int64 with 0 for
  left padding, or None when every row is real -> (logits (B, V), state) for a fresh window.
- ``forward(tokens, state, every=False)``: tokens (B,) or (B, K) appended to the window ->
  the logits of the last new position (B, V), or of every new one (B, K, V) with ``every``
  (one pass verifies K speculated tokens), and the new state. The caller keeps
  ``state.length + K <= block_size`` (positions are learned; a cache cannot slide).
- ``rewind(state, length)``: the state with only its first ``length`` positions (a rejected
  speculation is dropped).
- ``select(state, rows)``: the state of those rows only, in that order (a finished row
  leaves the batch; a permutation reorders it), with the leading columns that are padding
  in every kept row dropped.
- ``merge(states)``: one state of all the states' rows in turn, right-aligned to the longest
  (shorter ones are left-padded): a prompt prefilled alone joins a running batch.

A state is a value: each call returns a new one and leaves the given one as it was (static
caches, written in place, keep that promise for the positions a state holds: rewinding or
decoding an older state of the same window overwrites the slots past its length).
Logits are float32 torch tensors on ``backend.device`` that the caller owns: a later call
never overwrites them (``compiled`` copies its CUDA graph's output buffer for that).

Optional attribute ``host_threads``: the torch intra-op thread count the loop runs under
while it drives this backend (absent or None: torch's own setting); the ort backend on the
CPU asks for 1 (see ``ort.py``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from slm_export.config import GPTConfig
from slm_export.tokenizer import EOT_ID


@dataclass(frozen=True)
class State:
    """What a backend carries between calls for one batch.

    length: positions filled in the window (left padding included), <= block_size.
    batch:  rows.
    mask:   (batch, block_size) int64, 0 at left padding and 1 elsewhere (past ``length``
            too); None where no row is padded (backends whose graphs always take a mask
            always keep one).
    cache:  the backend's own data (KV tensors, a token window, ...); only the backend
            that made the state reads it.
    """

    length: int
    batch: int
    mask: torch.Tensor | None = None
    cache: Any = None


@runtime_checkable
class Backend(Protocol):
    name: str
    config: GPTConfig
    device: torch.device

    def prefill(self, ids: torch.Tensor,
                attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, State]: ...

    def forward(self, tokens: torch.Tensor, state: State,
                every: bool = False) -> tuple[torch.Tensor, State]: ...

    def rewind(self, state: State, length: int) -> State: ...

    def select(self, state: State, rows: Sequence[int]) -> State: ...

    def merge(self, states: Sequence[State]) -> State: ...


@contextlib.contextmanager
def host_threads(backend: Backend) -> Iterator[None]:
    """torch's intra-op thread count set to ``backend.host_threads`` inside, if it has one.

    For a whole generation, not per step: switching the count back and forth between steps
    wakes torch's OpenMP workers each time, which is the contention it avoids."""
    n, before = getattr(backend, "host_threads", None), torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Cached:
    """The contract over five hooks, for every backend here; a subclass sets ``config``,
    ``device`` and ``always_mask`` (its graphs take a mask even without padding) and
    implements:

    - ``_empty(B)``: the cache of an empty window;
    - ``_forward(rows (B, K), state, every) -> (logits (B, K or 1, V) float32, cache)``;
    - ``_rewind(cache, length)`` (default: the cache as it is, for static windows);
    - ``_take(cache, rows (B',) int64, start, length, mask)``: the cache of those rows with
      columns start..start+length moved to 0..length;
    - ``_stack(parts, length, mask)``: one cache from [(cache, shift, length_i)], each part's
      columns 0..length_i moved to shift..shift+length_i (shift + length_i = length).
    ``mask`` is the new state's.
    """

    config: GPTConfig
    device: torch.device
    always_mask = False

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if ids.dim() != 2 or ids.size(1) == 0:
            raise ValueError(f"prefill expects ids of shape (B, T) with T >= 1, got {tuple(ids.shape)}")
        return self.forward(ids, self.start(ids.size(0), attention_mask))

    def start(self, batch: int, attention_mask: torch.Tensor | None = None) -> State:
        """An empty window for ``batch`` rows (``forward(ids, start(B), every=True)``: the
        logits of every position of a prompt)."""
        mask = window_mask(attention_mask, batch, self.config.block_size, self.device, self.always_mask)
        return State(0, batch, mask, self._empty(batch))

    def forward(self, tokens: torch.Tensor, state: State, every: bool = False):
        rows = tokens.view(-1, 1) if tokens.dim() == 1 else tokens
        if rows.dim() != 2 or rows.size(1) == 0 or rows.size(0) != state.batch:
            raise ValueError(f"forward expects tokens of shape ({state.batch},) or "
                             f"({state.batch}, K), got {tuple(tokens.shape)}")
        if state.length + rows.size(1) > self.config.block_size:
            raise ValueError(f"{rows.size(1)} token(s) after {state.length} exceed block_size "
                             f"{self.config.block_size}: re-prefill first")
        logits, cache = self._forward(rows.to(self.device), state, every)
        after = State(state.length + rows.size(1), state.batch, state.mask, cache)
        return (logits if every else logits[:, -1]), after

    def rewind(self, state: State, length: int) -> State:
        if not 0 < length <= state.length:
            raise ValueError(f"rewind to {length} positions of a state holding {state.length}")
        return State(length, state.batch, state.mask, self._rewind(state.cache, length))

    def _rewind(self, cache, length: int):
        return cache

    def select(self, state: State, rows: Sequence[int]) -> State:
        rows = list(rows)
        if not rows or not all(0 <= r < state.batch for r in rows):
            raise ValueError(f"select rows {rows} of a batch of {state.batch}")
        if rows == list(range(state.batch)):
            return state
        index = torch.tensor(rows, device=self.device)
        mask = None if state.mask is None else state.mask.index_select(0, index)
        drop = leading_padding(mask, state.length)
        length = state.length - drop
        mask = self._normal(shift_mask(mask, -drop, len(rows), self.config.block_size, self.device),
                            length)
        return State(length, len(rows), mask, self._take(state.cache, index, drop, length, mask))

    def merge(self, states: Sequence[State]) -> State:
        if len(states) == 1:
            return states[0]
        length, W = max(s.length for s in states), self.config.block_size
        mask = self._normal(torch.cat([shift_mask(s.mask, length - s.length, s.batch, W, self.device,
                                                  s.length) for s in states]), length)
        parts = [(s.cache, length - s.length, s.length) for s in states]
        return State(length, sum(s.batch for s in states), mask, self._stack(parts, length, mask))

    def _normal(self, mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """None for a mask without padding where the backend's graphs need none."""
        if mask is not None and not self.always_mask and bool(mask[:, :length].all()):
            return None
        return mask


def window_mask(attention_mask: torch.Tensor | None, batch: int, block_size: int,
                device: torch.device, always: bool = False) -> torch.Tensor | None:
    """The prompt's (B, T) padding mask widened to a (B, block_size) buffer of ones, so a
    step reads ``mask[:, :length]`` (a view, no per-step allocation).

    None when the prompt has no padding, unless ``always`` (graphs that always take a mask).
    """
    if attention_mask is None and not always:
        return None
    mask = torch.ones(batch, block_size, dtype=torch.long, device=device)
    if attention_mask is not None:
        mask[:, :attention_mask.size(1)] = attention_mask
    return mask


def leading_padding(mask: torch.Tensor | None, length: int) -> int:
    """How many of the first columns are padding in every row (0 without a mask)."""
    if mask is None:
        return 0
    real = mask[:, :length].any(0).nonzero()
    return int(real[0]) if len(real) else length


def shift_mask(mask: torch.Tensor | None, shift: int, batch: int, block_size: int,
               device: torch.device, length: int | None = None) -> torch.Tensor:
    """``mask`` (or all ones) moved ``shift`` columns right (left if negative), padding coming
    in on the left, ones on the right; with ``length``, only its first columns move."""
    out = torch.ones(batch, block_size, dtype=torch.long, device=device)
    if shift > 0:
        out[:, :shift] = 0
    if mask is not None:
        n = block_size - max(shift, 0) if length is None else length
        src = mask[:, max(-shift, 0):max(-shift, 0) + n]
        out[:, max(shift, 0):max(shift, 0) + src.size(1)] = src
    return out


def left_pad(rows: Sequence[Sequence[int]], device: torch.device | str = "cpu",
             pad_id: int = EOT_ID) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token rows -> ids (B, T) int64 left-padded, and a (B, T) mask (None if all same length)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            ids[b, T - len(row):] = torch.as_tensor(row, dtype=torch.long)
            mask[b, T - len(row):] = 1
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


# -- functional and static KV caches: what the backends' hooks share --------------------------

def take_kv(kv: tuple, rows: torch.Tensor, start: int, length: int, dense: bool = False) -> tuple:
    """``Cached._take`` of a functional cache (B, nh, P, hs) per tensor."""
    out = tuple(t.index_select(0, rows)[:, :, start:start + length] for t in kv)
    return tuple(t.contiguous() for t in out) if dense else out


def stack_kv(parts: list, length: int) -> tuple:
    """``Cached._stack`` of functional caches: each left-padded with zeros, then concatenated."""
    from torch.nn import functional as F

    return tuple(torch.cat([F.pad(kv[i], (0, 0, shift, 0)) for kv, shift, _ in parts])
                 for i in range(len(parts[0][0])))


class FunctionalCached(Cached):
    """``Cached`` over a functional cache: a tuple of (B, nh, P, hs) tensors that a forward
    grows by concatenation, so rewinding slices, taking rows indexes and stacking pads."""

    def _rewind(self, kv, length):
        return tuple(t[:, :, :length] for t in kv)

    def _take(self, kv, rows, start, length, mask):
        return take_kv(kv, rows, start, length)

    def _stack(self, parts, length, mask):
        return stack_kv(parts, length)


class Window:
    """A static cache's ``cache``: one generation's preallocated windows (2 * n_layer tensors
    (capacity, nh, block_size, hs)) for its first ``rows`` rows, lent by a ``WindowPool``."""

    def __init__(self, tensors: tuple, rows: int):
        self.tensors, self.rows = tensors, rows


class WindowPool:
    """Preallocated windows for the backends that write their cache in place (``compiled``,
    ``aoti``), lent per capacity: a window is free again once no state holds it (a weak
    reference tells), so sequential generations reuse one allocation, and a merge or select
    never writes into a window a live state reads. ``capacity(rows)``: how many rows a window
    for ``rows`` has (a compiled graph per batch size: ``compiled`` rounds up to powers of 2)."""

    def __init__(self, new: Any, capacity: Any = None, reuse: bool = True):
        self._new = new  # capacity -> tuple of zero tensors
        self.capacity = capacity or (lambda rows: rows)
        self.reuse = reuse  # False: a new window every time (a runtime that returns its windows)
        self._lent: dict[int, list] = {}  # capacity -> [[tensors, weakref to the Window]]

    def lend(self, rows: int) -> Window:
        size = self.capacity(rows)
        if not self.reuse:
            return Window(self._new(size), rows)
        for entry in self._lent.setdefault(size, []):
            if entry[1]() is None:
                window = Window(entry[0], rows)
                entry[1] = weakref.ref(window)
                return window
        window = Window(self._new(size), rows)
        self._lent[size].append([window.tensors, weakref.ref(window)])
        return window

    def take(self, window: Window, rows: torch.Tensor, start: int, length: int) -> Window:
        """``Cached._take``: the rows' slots start..start+length copied to 0..length."""
        out = self.lend(len(rows))
        for dst, src in zip(out.tensors, window.tensors, strict=True):
            dst[:len(rows), :, :length] = src.index_select(0, rows)[:, :, start:start + length]
        return out

    def stack(self, parts: list, length: int) -> Window:
        """``Cached._stack``: each part's slots 0..n copied to shift..shift+n of its rows."""
        out = self.lend(sum(w.rows for w, _, _ in parts))
        row = 0
        for window, shift, n in parts:
            for dst, src in zip(out.tensors, window.tensors, strict=True):
                dst[row:row + window.rows, :, shift:shift + n] = src[:window.rows, :, :n]
            row += window.rows
        return out
