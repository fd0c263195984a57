"""What the backends over an exported cache graph share (torchscript, ort).

The graph has the signature of ``artifacts/kv_layout.py``: input_ids, attention_mask,
position_ids, the past per layer and logits_to_keep -> logits of the kept positions and the
present. The graph always takes a mask and position ids, so a state carries (B, block_size)
buffers of both (ones and 0..block_size-1 when nothing is padded) and each call passes views
of them; the past lives in the state as the last call's present.
"""

from __future__ import annotations

import torch

from slm_export.model import empty_kv, positions_from_mask
from slm_export.runtime.base import State, check_prefill, check_rewind, decode_rows, window_mask


class GraphBackend:
    """prefill / score / decode / rewind over ``_run``, which a subclass implements:
    ``_run(ids (B, T), past, mask (B, P+T), pos (B, T), keep) -> (logits (B, keep, V) fp32,
    present)``."""

    kv_dtype = torch.float32
    dense_cache = False  # True where the runtime reads the cache by pointer (rewind copies)

    def _run(self, ids, past, mask, pos, keep: int):
        raise NotImplementedError

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        check_prefill(ids, self.config.block_size)
        B, T = ids.shape
        mask = window_mask(attention_mask, B, self.config.block_size, self.device, always=True)
        pos = positions_from_mask(mask)
        past = empty_kv(self.config, B, self.device, self.kv_dtype)
        logits, present = self._run(ids.to(self.device), past, mask[:, :T], pos[:, :T], 1)
        return logits[:, -1], State(T, (present, mask, pos))

    def score(self, tokens: torch.Tensor, state: State, keep: int | None = None):
        rows = decode_rows(tokens, state, self.config.block_size)
        past, mask, pos = state.cache
        start, n = state.length, state.length + rows.size(1)
        logits, present = self._run(rows.to(self.device), past, mask[:, :n], pos[:, start:n],
                                    rows.size(1) if keep is None else keep)
        return logits, State(n, (present, mask, pos))

    def decode(self, tokens: torch.Tensor, state: State):
        logits, state = self.score(tokens, state, keep=1)
        return logits[:, -1], state

    def rewind(self, state: State, length: int) -> State:
        check_rewind(state, length)
        past, mask, pos = state.cache
        kept = tuple(t[:, :, :length] for t in past)
        if self.dense_cache:
            kept = tuple(t.contiguous() for t in kept)
        return State(length, (kept, mask, pos))
