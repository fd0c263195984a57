"""naive: no cache, the whole window is recomputed at every step (the references' way).

This is the yardstick the benchmarks measure the cached backends against. Tokens live in a
(B, block_size) buffer owned by the state; each step writes the new column(s) into a copy
and runs the model on the filled part (``GPT.forward`` without padding, ``forward_kv`` with
an empty cache and the padding mask otherwise: the same full recompute).
"""

from __future__ import annotations

import torch

from slm_export.model import GPT
from slm_export.runtime.base import Cached


class NaiveBackend(Cached):
    name = "naive"

    def __init__(self, model: GPT):
        self.model = model.eval()
        self.config = model.config
        self.device = model.lm_head.weight.device

    def _empty(self, B: int) -> torch.Tensor:
        return torch.zeros(B, self.config.block_size, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def _forward(self, rows, state, every):
        n, K = state.length + rows.size(1), rows.size(1)
        window = state.cache.clone()  # the old state keeps its tokens (states are values)
        window[:, state.length:n] = rows
        ids = window[:, :n]
        if state.mask is None and not every:
            logits, _ = self.model(ids)  # (B, 1, V), the causal fast path
        else:
            mask = None if state.mask is None else state.mask[:, :n]
            logits, _ = self.model.forward_kv(ids, self.model.empty_kv(ids.size(0)), mask,
                                              logits_to_keep=K if every else 1)
        return logits.float(), window

    def _take(self, window, rows, start, length, mask):
        out = self._empty(len(rows))
        out[:, :length] = window.index_select(0, rows)[:, start:start + length]
        return out

    def _stack(self, parts, length, mask):
        out = torch.cat([self._empty(w.size(0)) for w, _, _ in parts])
        row = 0
        for window, shift, n in parts:
            out[row:row + window.size(0), shift:shift + n] = window[:, :n]
            row += window.size(0)
        return out
