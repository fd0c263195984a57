"""eager: PyTorch with the functional KV cache (``GPT.forward_kv``).

Prefill runs the prompt once; each step feeds the new token(s) of every row and grows the
cache by concatenation. A padded batch keeps its mask as a (B, block_size) buffer that a
step reads a view of; an unpadded one has none.

The backend runs a copy of the model whose tied embedding / lm_head is stored in vocabulary
blocks (``model.blocked_head``: the other Parameters are shared, the model passed in is left
as it was), the lm_head's layout fastest on the CPU at the few rows of a step.
"""

from __future__ import annotations

import torch

from slm_export.model import GPT, blocked_head, empty_kv
from slm_export.runtime.base import FunctionalCached


class EagerBackend(FunctionalCached):
    name = "eager"

    def __init__(self, model: GPT):
        self.model = blocked_head(model.eval())
        self.config = model.config
        self.device = model.lm_head.weight.device

    def _empty(self, B: int):
        return empty_kv(self.config, B, self.device, self.model.lm_head.weight.dtype)

    @torch.no_grad()
    def _forward(self, rows, state, every):
        n = state.length + rows.size(1)
        mask = None if state.mask is None else state.mask[:, :n]
        logits, kv = self.model.forward_kv(rows, state.cache, mask,
                                           logits_to_keep=rows.size(1) if every else 1)
        return logits.float(), kv
