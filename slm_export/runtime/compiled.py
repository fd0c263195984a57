"""compiled: ``torch.compile`` of ``GPT.forward_static`` with a preallocated static KV cache.

Two compiled entry points, each its own function so their compiled graphs are cached apart:
- prefill: the prompt length is marked dynamic, so new prompt lengths (and overflow
  re-prefills) reuse one graph instead of recompiling;
- decode: one token per row at ``input_pos``; every shape is fixed (caches and the mask are
  always (B, block_size)), so it compiles once per batch size. On CUDA it uses
  ``mode="reduce-overhead"`` (CUDA graphs).
A mask is always passed (ones when nothing is padded) so padded and unpadded batches share
the same graphs. A one-token prompt goes through the decode graph (same shapes).
"""

from __future__ import annotations

import contextlib

import torch
import torch._inductor.config

from slm_export.model import GPT
from slm_export.runtime.base import State, check_prefill


def _prefill_step(model: GPT, idx, input_pos, caches, mask):
    return model.forward_static(idx, input_pos, caches, mask)


def _decode_step(model: GPT, idx, input_pos, caches, mask):
    return model.forward_static(idx, input_pos, caches, mask)


class CompiledBackend:
    name = "compiled"

    def __init__(self, model: GPT, mode: str | None = None):
        self.model = model.eval()
        self.config = model.config
        self.device = model.lm_head.weight.device
        if mode is None and self.device.type == "cuda":
            mode = "reduce-overhead"
        self.mode = mode
        self._prefill = torch.compile(_prefill_step, fullgraph=True)
        self._decode = torch.compile(_decode_step, fullgraph=True, mode=mode)
        # On CPU, inductor "freezing" folds the inference-only weights into the graph as
        # constants and pre-packs them for the matmul kernels: +40% decode tokens/s on the
        # 30m model (bench/RESULTS.md). It must be on whenever a call may (re)compile.
        self._inductor_options = (contextlib.nullcontext if self.device.type == "cuda"
                                  else lambda: torch._inductor.config.patch(freezing=True))
        W = self.config.block_size
        self._positions = torch.arange(W, device=self.device)
        self._pos1 = torch.zeros(1, dtype=torch.long, device=self.device)
        self._caches: dict[int, torch.nn.ModuleList] = {}  # one static cache per batch size
        self._ones: dict[int, torch.Tensor] = {}

    def _for_batch(self, B: int):
        if B not in self._caches:
            W = self.config.block_size
            self._caches[B] = self.model.new_static_caches(B, W)
            self._ones[B] = torch.ones(B, W, dtype=torch.long, device=self.device)
        return self._caches[B], self._ones[B]

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        check_prefill(ids, self.config.block_size)
        B, T = ids.shape
        caches, ones = self._for_batch(B)
        if attention_mask is None:
            mask = ones
        else:
            mask = ones.clone()
            mask[:, :T] = attention_mask
        if T == 1:
            self._pos1.fill_(0)
            with self._inductor_options():
                logits = self._decode(self.model, ids, self._pos1, caches, mask)
        else:
            input_pos = self._positions[:T]
            torch._dynamo.maybe_mark_dynamic(ids, 1)
            torch._dynamo.maybe_mark_dynamic(input_pos, 0)
            with self._inductor_options():
                logits = self._prefill(self.model, ids, input_pos, caches, mask)
        # Stale slots beyond T need no reset: the causal mask hides them until overwritten.
        return logits.float(), State(length=T, mask=None if attention_mask is None else mask,
                                     cache=(caches, mask))

    def decode(self, tokens: torch.Tensor, state: State):
        caches, mask = state.cache
        self._pos1.fill_(state.length)
        with self._inductor_options():
            logits = self._decode(self.model, tokens.view(-1, 1), self._pos1, caches, mask)
        state.length += 1
        return logits.float(), state
