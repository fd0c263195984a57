"""torchscript: the exported ``model_kv.ts`` (the functional KV-cache signature).

``forward(input_ids (B, T), past_key_values (L, 2, B, nh, P, hs), attention_mask (B, P+T))
-> (logits (B, V), present_key_values)``. The exported graph always takes a mask, so an
unpadded batch carries a (B, block_size) buffer of ones; a step passes a view of it.
"""

from __future__ import annotations

import os

import torch

from slm_export.artifacts.loaders import load_torchscript
from slm_export.config import GPTConfig
from slm_export.model import empty_kv
from slm_export.runtime.base import State, check_prefill, decode_rows, window_mask


class TorchScriptBackend:
    name = "torchscript"

    def __init__(self, path: str | os.PathLike, config: GPTConfig,
                 device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.path = path
        self.module, _ = load_torchscript(path, map_location=self.device)

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        check_prefill(ids, self.config.block_size)
        B, T = ids.shape
        c = self.config
        mask = window_mask(attention_mask, B, c.block_size, self.device, always=True)
        logits, kv = self.module(ids, empty_kv(c, B, self.device), mask[:, :T])
        return logits.float(), State(T, (kv, mask))

    def decode(self, tokens: torch.Tensor, state: State):
        rows = decode_rows(tokens, state, self.config.block_size)
        kv, mask = state.cache
        n = state.length + rows.size(1)
        logits, kv = self.module(rows, kv, mask[:, :n])
        return logits.float(), State(n, (kv, mask))
