"""compiled: ``torch.compile`` of ``GPT.forward_static`` with a preallocated static KV cache.

Two compiled entry points, each its own function so their compiled graphs are cached apart:
- prefill: the prompt length is marked dynamic, so new prompt lengths (and overflow
  re-prefills) reuse one graph instead of recompiling; several tokens after a past go
  through it too;
- decode: one token per row at ``input_pos``; every shape is fixed (caches and the mask are
  always (B, block_size)), so it compiles once per batch size. On CUDA it uses
  ``mode="reduce-overhead"`` (CUDA graphs) — CUDA-only, not exercised in CI
  (tests/test_runtime.py::test_cuda_greedy_parity covers it on a GPU).
A mask is always passed (ones when nothing is padded) so padded and unpadded batches share
the same graphs. A one-token prompt goes through the decode graph (same shapes). Every call
runs with grad off, whatever the caller's grad mode: inductor freezes the weights of a graph
without autograd only, and on the CPU the decode and score graphs need frozen weights
(``inductor_cpu.py``).

The static cache of a batch size is shared by every generation of that size (a compiled
graph is specialised to its buffers), so this backend serves one live generation per batch
size: a prefill invalidates the older states of its size (``StaleStateError`` on use).
"""

from __future__ import annotations

import contextlib

import torch
import torch._dynamo.config
import torch._inductor.config

from slm_export.inductor_cpu import cpu_options
from slm_export.model import GPT
from slm_export.runtime.base import State, StaticSlots, check_rewind

RECOMPILE_LIMIT = 64  # graphs per compiled function: batch sizes x models in one process
# torch 2.6 calls the setting cache_size_limit; later versions recompile_limit (an alias).
_RECOMPILE_LIMIT = ("recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit")
                    else "cache_size_limit")


def _prefill_step(model: GPT, idx, input_pos, caches, mask):
    return model.forward_static(idx, input_pos, caches, mask)


def _decode_step(model: GPT, idx, input_pos, caches, mask):
    return model.forward_static(idx, input_pos, caches, mask)


def _score_step(model: GPT, idx, input_pos, caches, mask):
    return model.forward_static(idx, input_pos, caches, mask, all_logits=True)


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
        self._score = torch.compile(_score_step, fullgraph=True)  # compiled at its first use
        self._freeze = self.device.type == "cpu"
        self._positions = torch.arange(self.config.block_size, device=self.device)
        self._pos1 = torch.zeros(1, dtype=torch.long, device=self.device)
        self._slots = StaticSlots(lambda B: model.new_static_caches(B, self.config.block_size),
                                  self.config.block_size, self.device)

    @contextlib.contextmanager
    def _compiling(self, few_rows: bool):
        """The settings every call that may (re)compile runs under.

        - dynamo keeps its compiled graphs per code object, shared by every backend in the
          process, and recompiles per batch size (and per model): its default limit of 8
          graphs per function would make the ninth a hard error under ``fullgraph=True``.
        - on CPU, ``inductor_cpu.cpu_options``: "freezing" (the weights pre-packed for the
          matmul kernels: +20-45% decode tokens/s on the 30m model), and for the graphs of a
          few rows (decode, score) inductor's C++ GEMM template instead of MKL's (bench/RESULTS.md).
        """
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch._dynamo.config.patch({_RECOMPILE_LIMIT: RECOMPILE_LIMIT}))
            if self._freeze:
                stack.enter_context(torch._inductor.config.patch(cpu_options(few_rows)))
            yield

    def _run(self, rows: torch.Tensor, start: int, caches, mask) -> torch.Tensor:
        """Write ``rows`` (B, K) at positions start.. into ``caches`` -> last logits."""
        K = rows.size(1)
        with self._compiling(few_rows=K == 1):
            if K == 1:
                self._pos1.fill_(start)
                return self._decode(self.model, rows, self._pos1, caches, mask)
            input_pos = self._positions[start:start + K]
            torch._dynamo.maybe_mark_dynamic(rows, 1)
            torch._dynamo.maybe_mark_dynamic(input_pos, 0)
            return self._prefill(self.model, rows, input_pos, caches, mask)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        slot = self._slots.claim(ids, attention_mask)
        # Stale slots beyond T need no reset: the causal mask hides them until overwritten.
        logits = self._run(ids, 0, slot.caches, slot.mask)
        return logits.float(), State(ids.size(1), slot)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, state: State):
        rows = self._slots.live(tokens, state)
        logits = self._run(rows, state.length, state.cache.caches, state.cache.mask)
        return logits.float(), State(state.length + rows.size(1), state.cache)

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, state: State):
        rows = self._slots.live(tokens, state)
        input_pos = self._positions[state.length:state.length + rows.size(1)]
        torch._dynamo.maybe_mark_dynamic(rows, 1)
        torch._dynamo.maybe_mark_dynamic(input_pos, 0)
        with self._compiling(few_rows=True):
            logits = self._score(self.model, rows, input_pos, state.cache.caches, state.cache.mask)
        return logits.float(), State(state.length + rows.size(1), state.cache)

    def rewind(self, state: State, length: int) -> State:
        """Moves the position back: slots past it are hidden by the causal mask (queries at
        input_pos see keys <= input_pos) until a later step overwrites them."""
        check_rewind(state, length)
        return State(length, state.cache)
