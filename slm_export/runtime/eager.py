"""eager: PyTorch with the functional KV cache (``GPT.forward_kv``).

Prefill runs the prompt once; each decode step feeds the new token(s) of every row and grows
the cache by concatenation. A padded batch keeps its mask as a (B, block_size) buffer that a
step reads a view of; an unpadded one has none.

The backend runs a copy of the model whose tied embedding / lm_head is stored in vocabulary
blocks (``model.blocked_head``: the other Parameters are shared, the model passed in is left
as it was), the lm_head's layout fastest on the CPU at the few rows of a decode step.
"""

from __future__ import annotations

import torch

from slm_export.model import GPT, blocked_head
from slm_export.runtime.base import State, check_prefill, check_rewind, decode_rows, window_mask


class EagerBackend:
    name = "eager"

    def __init__(self, model: GPT):
        self.model = blocked_head(model.eval())
        self.config = model.config
        self.device = model.lm_head.weight.device

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        check_prefill(ids, self.config.block_size)
        B, T = ids.shape
        logits, kv = self.model.forward_kv(ids, self.model.empty_kv(B), attention_mask)
        mask = window_mask(attention_mask, B, self.config.block_size, self.device)
        return logits[:, -1].float(), State(T, (kv, mask))

    def score(self, tokens: torch.Tensor, state: State):
        rows = decode_rows(tokens, state, self.config.block_size)
        kv, mask = state.cache
        n = state.length + rows.size(1)
        logits, kv = self.model.forward_kv(rows, kv, None if mask is None else mask[:, :n],
                                           logits_to_keep=rows.size(1))
        return logits.float(), State(n, (kv, mask))

    def decode(self, tokens: torch.Tensor, state: State):
        rows = decode_rows(tokens, state, self.config.block_size)
        kv, mask = state.cache
        n = state.length + rows.size(1)
        logits, kv = self.model.forward_kv(rows, kv, None if mask is None else mask[:, :n])
        return logits[:, -1].float(), State(n, (kv, mask))

    def rewind(self, state: State, length: int) -> State:
        check_rewind(state, length)
        kv, mask = state.cache
        return State(length, (tuple(t[:, :, :length] for t in kv), mask))
