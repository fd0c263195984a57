"""What the backends over an exported cache graph share (torchscript, ort).

The graph has the signature of ``artifacts/kv_layout.py``: input_ids, attention_mask,
position_ids, the past per layer and logits_to_keep -> logits of the kept positions and the
present. The graph always takes a mask and position ids, so a state always carries the
(B, block_size) mask, and its cache the matching position ids beside the past (the last
call's present); each call passes views of both.
"""

from __future__ import annotations

import torch

from slm_export.model import empty_kv, positions_from_mask
from slm_export.runtime.base import Cached, stack_kv, take_kv


class GraphBackend(Cached):
    """The contract's hooks over ``_run``, which a subclass implements:
    ``_run(ids (B, T), past, mask (B, P+T), pos (B, T), keep) -> (logits (B, keep, V) fp32,
    present)``."""

    always_mask = True
    kv_dtype = torch.float32
    dense_cache = False  # True where the runtime reads the cache by pointer (contiguous)

    def _run(self, ids, past, mask, pos, keep: int):
        raise NotImplementedError

    def _empty(self, B: int):
        return empty_kv(self.config, B, self.device, self.kv_dtype), None

    def _forward(self, rows, state, every):
        past, pos = state.cache
        if pos is None:  # a fresh window: the positions of its mask
            pos = positions_from_mask(state.mask)
        start, n = state.length, state.length + rows.size(1)
        logits, present = self._run(rows, past, state.mask[:, :n], pos[:, start:n],
                                    rows.size(1) if every else 1)
        return logits, (present, pos)

    def _rewind(self, cache, length):
        past, pos = cache
        kept = tuple(t[:, :, :length] for t in past)
        if self.dense_cache:
            kept = tuple(t.contiguous() for t in kept)
        return kept, pos

    def _take(self, cache, rows, start, length, mask):
        return take_kv(cache[0], rows, start, length, self.dense_cache), positions_from_mask(mask)

    def _stack(self, parts, length, mask):
        return stack_kv([(c[0], shift, n) for c, shift, n in parts], length), positions_from_mask(mask)
