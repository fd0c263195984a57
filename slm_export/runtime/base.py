"""The runtime contract: one small interface, implemented once per backend.

A backend turns token ids into last-position logits; everything else (sampling, stop
rules, context overflow, streaming) lives in ``generation.py`` and is written once.

- ``prefill(ids, attention_mask)``: ids (B, T) int64, attention_mask (B, T) int64 with 0 for
  left padding, or None when every row is real -> (logits (B, V), state) for a fresh window.
- ``decode(tokens, state)``: tokens (B,) (one new token per row) or (B, K) (K new tokens per
  row) appended to the window -> (logits of the last new position (B, V), new state).
  The caller keeps ``state.length + K <= block_size`` (positions are learned; a cache cannot
  slide) and re-prefills when the window is full.
- ``score(tokens, state)``: like ``decode`` of (B, K) tokens, but -> logits after each of
  them (B, K, V): one forward pass verifies K speculated tokens.
- ``rewind(state, length)``: the state with only its first ``length`` positions (a rejected
  speculation is dropped): functional caches slice, static caches move their position.

Optional attribute ``host_threads``: the torch intra-op thread count a whole generation on
this backend should run under (``host_threads(backend)``; ``generate`` and generate.py apply
it, a ``TokenStream`` user wraps the loop); absent or None: torch's own setting. The ort
backend on the CPU asks for 1 (see ``ort.py``).

Logits are float32 torch tensors on ``backend.device`` (CPU for a CPU runtime). A state is
a value: ``decode`` returns a new one and leaves the old one as it was, except where a
backend keeps its cache in preallocated storage (``compiled``, ``aoti``): there a backend serves one
live generation per batch size, and a prefill of the same batch size invalidates older
states (decoding one raises ``StaleStateError``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from slm_export.config import GPTConfig
from slm_export.tokenizer import EOT_ID

BACKENDS = ("eager", "compiled", "torchscript", "ort", "aoti", "naive")
TORCH_BACKENDS = ("eager", "compiled", "naive")  # load a checkpoint
EXPORT_BACKENDS = ("torchscript", "ort", "aoti")  # load an export folder


@dataclass(frozen=True)
class State:
    """What a backend carries between calls for one batch.

    length: positions filled in the window (left padding included), <= block_size.
    cache:  the backend's own data (KV tensors, a padding mask, a token window, ...); only
            the backend that made the state reads it.
    """

    length: int
    cache: Any = None


class StaleStateError(RuntimeError):
    """A state whose storage a later prefill has reused."""


@runtime_checkable
class Backend(Protocol):
    name: str
    config: GPTConfig
    device: torch.device

    def prefill(self, ids: torch.Tensor,
                attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, State]: ...

    def decode(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]: ...

    def score(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]: ...

    def rewind(self, state: State, length: int) -> State: ...


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


def window_mask(attention_mask: torch.Tensor | None, batch: int, block_size: int,
                device: torch.device, always: bool = False) -> torch.Tensor | None:
    """The prompt's (B, T) padding mask widened to a (B, block_size) buffer of ones, so a
    decode step reads ``mask[:, :length]`` (a view, no per-step allocation).

    None when the prompt has no padding, unless ``always`` (graphs that always take a mask).
    """
    if attention_mask is None and not always:
        return None
    mask = torch.ones(batch, block_size, dtype=torch.long, device=device)
    if attention_mask is not None:
        mask[:, :attention_mask.size(1)] = attention_mask
    return mask


@dataclass(frozen=True)
class Slot:
    """A static-cache state's ``cache``: the generation's ticket, the batch size's
    preallocated caches and the (B, block_size) padding mask."""

    ticket: int
    caches: Any
    mask: torch.Tensor


class StaticSlots:
    """One preallocated cache per batch size for the backends that write their cache in place
    (``compiled``, ``aoti``): a compiled graph is specialised to its buffers, so every
    generation of a batch size shares them. The newest prefill owns the batch size's cache;
    a state of an older generation is stale (``StaleStateError`` on use).
    """

    def __init__(self, new_caches: Callable[[int], Any], block_size: int, device: torch.device):
        self._new_caches, self.block_size, self.device = new_caches, block_size, device
        self._caches: dict[int, Any] = {}
        self._owner: dict[int, int] = {}  # batch size -> the live generation's ticket
        self._tickets = itertools.count()

    def claim(self, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Slot:
        """Checks a prompt and hands its batch size's cache to a new generation."""
        check_prefill(ids, self.block_size)
        B = ids.size(0)
        if B not in self._caches:
            self._caches[B] = self._new_caches(B)
        self._owner[B] = ticket = next(self._tickets)
        mask = window_mask(attention_mask, B, self.block_size, self.device, always=True)
        return Slot(ticket, self._caches[B], mask)

    def live(self, tokens: torch.Tensor, state: State) -> torch.Tensor:
        """``tokens`` as fresh contiguous (B, K) rows on the device, checked to fit the window
        and ``state`` to still own its cache. Fresh: a compiled graph guards on its inputs'
        strides and storage offset, and the loop passes views (a verify step's last column,
        strides (K, K) at offset K - 1), which ``.contiguous()`` returns as they are (a
        (1, 1) view counts as contiguous)."""
        rows = decode_rows(tokens, state, self.block_size)
        if self._owner.get(rows.size(0)) != state.cache.ticket:
            raise StaleStateError("this state's static cache was reused by a later prefill of "
                                  f"batch size {rows.size(0)} (one live generation per size)")
        return rows.to(self.device, copy=True, memory_format=torch.contiguous_format)


def check_prefill(ids: torch.Tensor, block_size: int) -> None:
    if ids.dim() != 2 or ids.size(1) == 0:
        raise ValueError(f"prefill expects ids of shape (B, T) with T >= 1, got {tuple(ids.shape)}")
    if ids.size(1) > block_size:
        raise ValueError(f"prefill of {ids.size(1)} tokens exceeds block_size {block_size}")


def decode_rows(tokens: torch.Tensor, state: State, block_size: int) -> torch.Tensor:
    """``tokens`` as (B, K) rows, checked to fit the window after ``state.length``."""
    rows = tokens.view(-1, 1) if tokens.dim() == 1 else tokens
    if rows.dim() != 2 or rows.size(1) == 0:
        raise ValueError(f"decode expects tokens of shape (B,) or (B, K), got {tuple(tokens.shape)}")
    if state.length + rows.size(1) > block_size:
        raise ValueError(f"decode of {rows.size(1)} token(s) after {state.length} exceeds "
                         f"block_size {block_size}: re-prefill first")
    return rows


def check_rewind(state: State, length: int) -> None:
    if not 0 < length <= state.length:
        raise ValueError(f"rewind to {length} positions of a state holding {state.length}")


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
