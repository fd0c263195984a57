"""eager: PyTorch with the functional KV cache (``GPT.forward_kv``).

Prefill runs the prompt once; each decode step feeds one token per row and grows the cache
by concatenation. The padding mask is a (B, block_size) buffer: a step reads a view of it.
"""

from __future__ import annotations

import torch

from slm_export.model import GPT
from slm_export.runtime.base import State, check_prefill, window_mask


class EagerBackend:
    name = "eager"

    def __init__(self, model: GPT):
        self.model = model.eval()
        self.config = model.config
        self.device = model.lm_head.weight.device

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        check_prefill(ids, self.config.block_size)
        kv = self.model.empty_kv(ids.size(0))
        logits, kv = self.model.forward_kv(ids, kv, attention_mask)
        mask = window_mask(attention_mask, self.config.block_size, self.device)
        return logits.float(), State(length=ids.size(1), mask=mask, cache=kv)

    def decode(self, tokens: torch.Tensor, state: State):
        n = state.length + 1
        mask = None if state.mask is None else state.mask[:, :n]
        logits, state.cache = self.model.forward_kv(tokens.view(-1, 1), state.cache, mask)
        state.length = n
        return logits.float(), state
