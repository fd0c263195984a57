"""The signatures the formats export (the contract the runtimes rely on).

- ``LogitsModule``: input_ids (B, T) int64 -> logits (B, T, V), every position.
- ``KVModule``: the cache graph of ``artifacts/kv_layout.py`` (the layout optimum and
  onnxruntime-genai share): input_ids, attention_mask, position_ids, the past per layer and
  logits_to_keep -> (logits (B, K, V), *present).
- ``StaticKVModule``: the static-cache graph of ``artifacts/kv_layout.py`` (AOTInductor):
  input_ids, attention_mask (B, block_size), input_pos, logits_index and the caller's
  preallocated cache per layer, written in place -> logits (B, K, V).
"""

from __future__ import annotations

import torch

from slm_export.export.attention_op import FusedCache
from slm_export.model import positions_from_mask


class LogitsModule(torch.nn.Module):
    """The full-recompute path with logits for every position (``GPT.forward`` keeps only
    the last one when there are no targets)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.eval()
        self.eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.hidden_states(input_ids))  # (B, T, V)


class KVModule(torch.nn.Module):
    """``GPT.forward_kv`` with explicit position ids and the present flattened into outputs.

    ``fused_attention``: each layer's attention is one custom op that the ONNX export writes
    as ONNX Runtime's MultiHeadAttention (``export/attention_op.py``); for the ONNX export
    only."""

    def __init__(self, model: torch.nn.Module, fused_attention: bool = False):
        super().__init__()
        self.model = model.eval()
        self.fused_attention = fused_attention
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past_key_values: tuple[torch.Tensor, ...],
                logits_to_keep: torch.Tensor):
        cache = None
        if self.fused_attention:
            def cache(k, v):
                return FusedCache(k, v, attention_mask)
        logits, present = self.model.forward_kv(input_ids, past_key_values, attention_mask,
                                                position_ids, logits_to_keep, cache)
        return (logits, *present)


def logits_inputs(config, batch: int = 2, seq: int = 16) -> tuple[torch.Tensor]:
    """Trace / export inputs for ``LogitsModule``."""
    return (torch.randint(0, config.vocab_size, (batch, seq)),)


def kv_inputs(config, batch: int = 2, seq: int = 5, past: int = 3) -> tuple:
    """Trace / export inputs for ``KVModule``: a non-empty past and more than one kept
    logit, so nothing gets specialised to sizes 0 or 1 by tracers."""
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    position_ids = positions_from_mask(mask)[:, past:]
    kv = tuple(torch.zeros(batch, config.n_head, past, config.head_dim)
               for _ in range(2 * config.n_layer))
    return ids, mask, position_ids, kv, torch.tensor(2)


class StaticKVModule(torch.nn.Module):
    """``GPT.forward_static`` over caches passed in as inputs (the export mutates them)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.eval()
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                input_pos: torch.Tensor, logits_index: torch.Tensor,
                cache: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.model.forward_static(input_ids, input_pos, cache, attention_mask, logits_index)


def static_kv_inputs(config, batch: int = 2, seq: int = 5, kept: int = 2, device=None) -> tuple:
    """Export inputs for ``StaticKVModule``: sizes >= 2 (torch.export specialises 0 and 1)."""
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    mask = torch.ones(batch, config.block_size, dtype=torch.long, device=device)
    input_pos = torch.arange(seq, device=device)
    logits_index = torch.arange(seq - kept, seq, device=device)
    cache = tuple(torch.zeros(batch, config.n_head, config.block_size, config.head_dim, device=device)
                  for _ in range(2 * config.n_layer))
    return ids, mask, input_pos, logits_index, cache
