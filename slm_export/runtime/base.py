"""The runtime contract: one small interface, implemented once per backend.

A backend turns token ids into last-position logits; everything else (sampling, stop
rules, context overflow, streaming) lives in ``generation.py`` and is written once.

- ``prefill(ids, attention_mask)``: ids (B, T) int64, attention_mask (B, T) int64 with 0 for
  left padding (or None when every row is real) -> (logits (B, V), state). It starts a
  fresh window: whatever the state held before is forgotten.
- ``decode(tokens, state)``: tokens (B,) int64, one new token per row -> (logits, state).
  The caller keeps ``state.length < block_size`` (positions are learned; a cache cannot
  slide) and re-prefills when the window is full.

Logits are float32 torch tensors on ``backend.device`` (CPU for a CPU runtime).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from slm_export.config import GPTConfig

BACKENDS = ("eager", "compiled", "torchscript", "ort", "naive")
TORCH_BACKENDS = ("eager", "compiled", "naive")  # load a checkpoint
EXPORT_BACKENDS = ("torchscript", "ort")  # load an export folder


@dataclass
class State:
    """What a backend carries between calls for one batch.

    length: positions filled in the window (prompt padding included), <= block_size.
    mask:   (B, block_size) int64 attention mask, 1 for real tokens, 0 for left padding;
            columns >= length are 1 (tokens still to come). None when no row is padded.
    cache:  the backend's own storage (a KV tensor, an OrtValue, a token window, ...).
    """

    length: int
    mask: torch.Tensor | None
    cache: Any = None


@runtime_checkable
class Backend(Protocol):
    name: str
    config: GPTConfig
    device: torch.device

    def prefill(self, ids: torch.Tensor,
                attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, State]: ...

    def decode(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]: ...


def window_mask(attention_mask: torch.Tensor | None, block_size: int,
                device: torch.device) -> torch.Tensor | None:
    """The prompt's (B, T) padding mask widened to a (B, block_size) buffer of ones.

    Decoding then reads ``mask[:, :length]`` (a view): no per-step allocation.
    """
    if attention_mask is None:
        return None
    B, T = attention_mask.shape
    mask = torch.ones(B, block_size, dtype=torch.long, device=device)
    mask[:, :T] = attention_mask
    return mask


def check_prefill(ids: torch.Tensor, block_size: int) -> None:
    if ids.dim() != 2 or ids.size(1) == 0:
        raise ValueError(f"prefill expects ids of shape (B, T) with T >= 1, got {tuple(ids.shape)}")
    if ids.size(1) > block_size:
        raise ValueError(f"prefill of {ids.size(1)} tokens exceeds block_size {block_size}")


def export_file(folder, kind: str, dtype: str = "fp32", verify_hashes: bool = True):
    """An export folder's file of ``kind``/``dtype`` and the model config: -> (path, config)."""
    from slm_export.export.manifest import file_for, read_manifest

    manifest = read_manifest(folder, verify_hashes=False)  # the one file we load is hashed below
    path = file_for(manifest, folder, kind, dtype, verify_hash=verify_hashes)
    return path, GPTConfig.from_dict(manifest["model_config"])
