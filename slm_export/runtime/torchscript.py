"""torchscript: the exported ``model_kv.ts`` (the cache signature of ``artifacts/kv_layout.py``).

``forward(input_ids (B, T), attention_mask (B, P+T), position_ids (B, T), past (tuple of
2 * n_layer (B, nh, P, hs)), logits_to_keep ()) -> (logits (B, K, V), *present)``. The graph
always takes a mask and position ids, so an unpadded batch carries a (B, block_size) buffer
of ones and its positions; a step passes views of them.
"""

from __future__ import annotations

import os

import torch

from slm_export.artifacts.loaders import load_torchscript
from slm_export.config import GPTConfig
from slm_export.model import empty_kv, positions_from_mask
from slm_export.runtime.base import State, check_prefill, check_rewind, decode_rows, window_mask


class TorchScriptBackend:
    name = "torchscript"

    def __init__(self, path: str | os.PathLike, config: GPTConfig,
                 device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.path = path
        self.module, _ = load_torchscript(path, map_location=self.device)
        self._keep_one = torch.ones((), dtype=torch.long, device=self.device)

    def _run(self, ids, past, mask, pos, keep: torch.Tensor):
        logits, *present = self.module(ids, mask, pos, past, keep)
        return logits.float(), tuple(present)

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        check_prefill(ids, self.config.block_size)
        B, T = ids.shape
        mask = window_mask(attention_mask, B, self.config.block_size, self.device, always=True)
        pos = positions_from_mask(mask)
        logits, present = self._run(ids, empty_kv(self.config, B, self.device), mask[:, :T],
                                    pos[:, :T], self._keep_one)
        return logits[:, -1], State(T, (present, mask, pos))

    def score(self, tokens: torch.Tensor, state: State, keep: torch.Tensor | None = None):
        rows = decode_rows(tokens, state, self.config.block_size)
        past, mask, pos = state.cache
        start, n = state.length, state.length + rows.size(1)
        keep = torch.tensor(rows.size(1), device=self.device) if keep is None else keep
        logits, present = self._run(rows, past, mask[:, :n], pos[:, start:n], keep)
        return logits, State(n, (present, mask, pos))

    def decode(self, tokens: torch.Tensor, state: State):
        logits, state = self.score(tokens, state, self._keep_one)
        return logits[:, -1], state

    def rewind(self, state: State, length: int) -> State:
        check_rewind(state, length)
        past, mask, pos = state.cache
        return State(length, (tuple(t[:, :, :length] for t in past), mask, pos))
