"""The two signatures every format exports (the contract the runtimes rely on).

- ``LogitsModule``: input_ids (B, T) int64 -> logits (B, T, V), every position.
- ``KVModule``: input_ids (B, T), past_key_values (L, 2, B, nh, P, hs), attention_mask
  (B, P + T) int64 -> logits (B, V) of the last position, present_key_values
  (L, 2, B, nh, P + T, hs). P may be 0.
"""

from __future__ import annotations

import torch

from slm_export.model import positions


class LogitsModule(torch.nn.Module):
    """The full-recompute path with logits for every position (``GPT.forward`` keeps only
    the last one when there are no targets)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.eval()
        self.eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = positions(input_ids, 0, input_ids.size(1))
        return self.model.lm_head(self.model._hidden(input_ids, pos))  # (B, T, V)


class KVModule(torch.nn.Module):
    """``GPT.forward_kv`` with the padding mask as a required input."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.eval()
        self.eval()

    def forward(self, input_ids: torch.Tensor, past_key_values: torch.Tensor,
                attention_mask: torch.Tensor):
        return self.model.forward_kv(input_ids, past_key_values, attention_mask)


def logits_inputs(config, batch: int = 2, seq: int = 16) -> tuple[torch.Tensor]:
    """Trace / export inputs for ``LogitsModule``."""
    return (torch.randint(0, config.vocab_size, (batch, seq)),)


def kv_inputs(config, batch: int = 2, seq: int = 5, past: int = 3):
    """Trace / export inputs for ``KVModule``: a non-empty past, so the concat is recorded
    generally (sizes of 0 or 1 get specialised by tracers)."""
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    kv = torch.zeros(config.n_layer, 2, batch, config.n_head, past, config.head_dim)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    return ids, kv, mask
