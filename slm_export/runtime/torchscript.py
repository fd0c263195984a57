"""torchscript: the exported ``model_kv.ts`` (the cache signature of ``artifacts/kv_layout.py``).

``forward(input_ids (B, T), attention_mask (B, P+T), position_ids (B, T), past (tuple of
2 * n_layer (B, nh, P, hs)), logits_to_keep ()) -> (logits (B, K, V), *present)``; the
window's bookkeeping is ``graph.GraphBackend``'s.
"""

from __future__ import annotations

import os

import torch

from slm_export.artifacts.loaders import load_torchscript
from slm_export.config import GPTConfig
from slm_export.runtime.graph import GraphBackend


class TorchScriptBackend(GraphBackend):
    name = "torchscript"

    def __init__(self, path: str | os.PathLike, config: GPTConfig,
                 device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.path = path
        self.module, _ = load_torchscript(path, map_location=self.device)
        self._keep = {}  # logits_to_keep as the 0-d tensors the graph takes

    def _run(self, ids, past, mask, pos, keep: int):
        if keep not in self._keep:
            self._keep[keep] = torch.tensor(keep, device=self.device)
        logits, *present = self.module(ids, mask, pos, past, self._keep[keep])
        return logits.float(), tuple(present)
