"""naive: no cache, the whole window is recomputed at every step (the references' way).

This is the yardstick the benchmarks measure the cached backends against. Tokens live in a
(B, block_size) buffer owned by the state; each step writes the new column(s) and runs
``GPT.forward`` on the filled part. Padded batches go through ``forward_kv`` with an empty
cache, which is the same full recompute with a padding mask.
"""

from __future__ import annotations

import torch

from slm_export.model import GPT
from slm_export.runtime.base import State, check_prefill, check_rewind, decode_rows, window_mask


class NaiveBackend:
    name = "naive"

    def __init__(self, model: GPT):
        self.model = model.eval()
        self.config = model.config
        self.device = model.lm_head.weight.device

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None, keep: int = 1) -> torch.Tensor:
        """Logits (B, keep, V) of the last ``keep`` positions, recomputing the whole window."""
        if mask is None and keep == 1:
            logits, _ = self.model(ids)  # (B, 1, V), the causal fast path
            return logits.float()
        logits, _ = self.model.forward_kv(ids, self.model.empty_kv(ids.size(0)), mask,
                                          logits_to_keep=keep)
        return logits.float()

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        check_prefill(ids, self.config.block_size)
        B, T = ids.shape
        window = torch.empty(B, self.config.block_size, dtype=torch.long, device=self.device)
        window[:, :T] = ids
        mask = window_mask(attention_mask, B, self.config.block_size, self.device)
        logits = self._forward(window[:, :T], None if mask is None else mask[:, :T])
        return logits[:, -1], State(T, (window, mask))

    def score(self, tokens: torch.Tensor, state: State):
        rows = decode_rows(tokens, state, self.config.block_size)
        window, mask = state.cache
        n = state.length + rows.size(1)
        window = window.clone()  # the old state keeps its tokens (states are values)
        window[:, state.length:n] = rows
        logits = self._forward(window[:, :n], None if mask is None else mask[:, :n], rows.size(1))
        return logits, State(n, (window, mask))

    def decode(self, tokens: torch.Tensor, state: State):
        rows = decode_rows(tokens, state, self.config.block_size)
        window, mask = state.cache
        n = state.length + rows.size(1)
        window = window.clone()
        window[:, state.length:n] = rows
        logits = self._forward(window[:, :n], None if mask is None else mask[:, :n])
        return logits[:, -1], State(n, (window, mask))

    def rewind(self, state: State, length: int) -> State:
        check_rewind(state, length)
        return State(length, state.cache)  # tokens past ``length`` are never read
