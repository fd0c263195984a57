"""torchscript: the exported ``model_kv.ts`` (the functional KV-cache signature).

``forward(input_ids (B, T), past_key_values (L, 2, B, nh, P, hs), attention_mask (B, P+T))
-> (logits (B, V), present_key_values)``. The exported graph always takes a mask, so an
unpadded batch carries a (B, block_size) buffer of ones; a step passes a view of it.
"""

from __future__ import annotations

import os

import torch

from slm_export.export.torchscript import load
from slm_export.runtime.base import State, check_prefill, export_file, window_mask


class TorchScriptBackend:
    name = "torchscript"

    def __init__(self, folder: str | os.PathLike, device: torch.device | str = "cpu",
                 verify_hashes: bool = True):
        path, self.config = export_file(folder, "torchscript_kv", verify_hashes=verify_hashes)
        self.device = torch.device(device)
        self.path = path
        self.module, _ = load(path, map_location=self.device)

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        check_prefill(ids, self.config.block_size)
        B, T = ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=self.device)
        mask = window_mask(attention_mask, self.config.block_size, self.device)
        c = self.config
        empty = torch.zeros(c.n_layer, 2, B, c.n_head, 0, c.head_dim, device=self.device)
        logits, kv = self.module(ids, empty, mask[:, :T])
        return logits.float(), State(length=T, mask=mask, cache=kv)

    def decode(self, tokens: torch.Tensor, state: State):
        n = state.length + 1
        logits, state.cache = self.module(tokens.view(-1, 1), state.cache, state.mask[:, :n])
        state.length = n
        return logits.float(), state
