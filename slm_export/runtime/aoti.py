"""aoti: the AOTInductor package ``model_kv.pt2`` (compiled ahead of time, loaded without compiling).

The package's graph is the static-cache signature of ``artifacts/kv_layout.py``: the backend
owns a preallocated window per layer (B, n_head, block_size, head_dim) that each call writes
in place at ``input_pos``, and asks for the logits of the last new position (prefill,
decode) or of every new one (``score``) through ``logits_index``. A mask is always passed
(ones where nothing is padded), so padded and unpadded batches run the same graph.

As in ``compiled``, the static cache of a batch size is shared by every generation of that
size: the backend serves one live generation per batch size, and a prefill invalidates the
older states of its size (``StaleStateError`` on use). Slots past a state's length hold
stale values that the causal mask hides, so a re-prefill or a rewind needs no reset.
"""

from __future__ import annotations

import os

import torch

from slm_export.artifacts.loaders import load_aoti
from slm_export.config import GPTConfig
from slm_export.runtime.base import Slot, State, StaticSlots, check_rewind


class AotiBackend:
    name = "aoti"

    def __init__(self, path: str | os.PathLike, config: GPTConfig,
                 device: torch.device | str = "cpu"):
        self.config, self.path = config, path
        self.device = torch.device(device)
        self.model, self.metadata = load_aoti(path, self.device)
        self._positions = torch.arange(config.block_size, device=self.device)
        self._slots = StaticSlots(self._new_caches, config.block_size, self.device)

    def _new_caches(self, B: int) -> tuple[torch.Tensor, ...]:
        c = self.config
        return tuple(torch.zeros(B, c.n_head, c.block_size, c.head_dim, device=self.device)
                     for _ in range(2 * c.n_layer))

    def _run(self, rows: torch.Tensor, start: int, slot: Slot, every: bool) -> torch.Tensor:
        """Write ``rows`` (B, K) at slots start.. -> logits (B, K or 1, V) float32."""
        K = rows.size(1)
        index = self._positions[:K] if every else self._positions[K - 1:K]
        positions = self._positions[start:start + K]
        return self.model(rows.contiguous(), slot.mask, positions, index, slot.caches).float()

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        slot = self._slots.claim(ids, attention_mask)
        logits = self._run(ids.to(self.device), 0, slot, every=False)
        return logits[:, -1], State(ids.size(1), slot)

    def decode(self, tokens: torch.Tensor, state: State):
        rows = self._slots.live(tokens, state)
        logits = self._run(rows, state.length, state.cache, every=False)
        return logits[:, -1], State(state.length + rows.size(1), state.cache)

    def score(self, tokens: torch.Tensor, state: State):
        rows = self._slots.live(tokens, state)
        logits = self._run(rows, state.length, state.cache, every=True)
        return logits, State(state.length + rows.size(1), state.cache)

    def rewind(self, state: State, length: int) -> State:
        """Moves the position back; the causal mask hides the slots past it."""
        check_rewind(state, length)
        return State(length, state.cache)
