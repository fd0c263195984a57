"""aoti: the AOTInductor package ``model_kv.pt2`` (compiled ahead of time, loaded without compiling).

The package's graph is the static-cache signature of ``artifacts/kv_layout.py``: the backend
lends each generation preallocated windows (B, n_head, block_size, head_dim) per layer
(``WindowPool``) that each call writes in place at ``input_pos``, and asks for the logits of
the last new position or of every new one through ``logits_index``. A mask is always passed
(ones where nothing is padded), so padded and unpadded batches run the same graph; batch
and sequence are dynamic in the package, so nothing compiles at run time.
"""

from __future__ import annotations

import os

import torch

from slm_export.artifacts.loaders import load_aoti
from slm_export.config import GPTConfig
from slm_export.runtime.base import Cached, WindowPool


class AotiBackend(Cached):
    name = "aoti"
    always_mask = True

    def __init__(self, path: str | os.PathLike, config: GPTConfig,
                 device: torch.device | str = "cpu"):
        self.config, self.path = config, path
        self.device = torch.device(device)
        self.model, self.metadata = load_aoti(path, self.device)
        self._positions = torch.arange(config.block_size, device=self.device)
        self._pool = WindowPool(self._new_window)

    def _new_window(self, B: int):
        c = self.config
        return tuple(torch.zeros(B, c.n_head, c.block_size, c.head_dim, device=self.device)
                     for _ in range(2 * c.n_layer))

    def _empty(self, B: int):
        return self._pool.lend(B)

    def _forward(self, rows, state, every):
        K, start = rows.size(1), state.length
        index = self._positions[:K] if every else self._positions[K - 1:K]
        logits = self.model(rows.contiguous(), state.mask, self._positions[start:start + K], index,
                            state.cache.tensors)
        return logits.float(), state.cache

    def _take(self, window, rows, start, length, mask):
        return self._pool.take(window, rows, start, length)

    def _stack(self, parts, length, mask):
        return self._pool.stack(parts, length)
