"""compiled: ``torch.compile`` of ``GPT.forward_static`` over preallocated windows.

Three compiled entry points, each its own function so their graphs are cached apart:
- prefill: the prompt length is marked dynamic, so new prompt lengths (and overflow
  re-prefills) reuse one graph instead of recompiling; the last position's logits;
- decode: one token per row; every shape is fixed (windows and the mask are always
  (B, block_size)), so it compiles once per batch size. On CUDA it uses
  ``mode="reduce-overhead"`` (CUDA graphs; the windows are marked as static addresses so the
  graph writes them in place) - CUDA-only, not exercised in CI
  (tests/test_runtime.py::test_cuda_greedy_parity covers it on a GPU);
- score: K tokens per row, the logits of each (a speculative verify step).
The windows are plain tensor inputs (``WindowPool``), so a new window of a known batch size
reuses the graphs, and a batch runs at the next power of two rows (its spare rows dummies that
see only themselves): a server whose batch changes at every step compiles log2(max batch) + 1
graphs per entry point, not one per size. A mask is always passed (ones when nothing is padded), so padded and
unpadded batches share the graphs. Every call runs with grad off, whatever the caller's grad
mode: inductor freezes the weights of a graph without autograd only, and on the CPU the
decode and score graphs need frozen weights (``inductor_cpu.py``).
"""

from __future__ import annotations

import contextlib

import torch
import torch._dynamo.config
import torch._inductor.config

from slm_export.inductor_cpu import cpu_options
from slm_export.model import GPT
from slm_export.runtime.base import Cached, WindowPool

RECOMPILE_LIMIT = 64  # graphs per compiled function: batch sizes x models in one process
# torch 2.6 calls the setting cache_size_limit; later versions recompile_limit (an alias).
_RECOMPILE_LIMIT = ("recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit")
                    else "cache_size_limit")


def _prefill_step(model: GPT, idx, input_pos, window, mask, index):
    return model.forward_static(idx, input_pos, window, mask, index)


def _decode_step(model: GPT, idx, input_pos, window, mask, index):
    return model.forward_static(idx, input_pos, window, mask, index)


def _score_step(model: GPT, idx, input_pos, window, mask, index):
    return model.forward_static(idx, input_pos, window, mask, index)


class CompiledBackend(Cached):
    name = "compiled"
    always_mask = True

    def __init__(self, model: GPT):
        self.model = model.eval()
        self.config = model.config
        self.device = model.lm_head.weight.device
        cuda = self.device.type == "cuda"
        self._prefill = torch.compile(_prefill_step, fullgraph=True)
        self._decode = torch.compile(_decode_step, fullgraph=True,
                                     mode="reduce-overhead" if cuda else None)
        self._score = torch.compile(_score_step, fullgraph=True)  # compiled at its first use
        self._positions = torch.arange(self.config.block_size, device=self.device)
        self._pos1 = torch.zeros(1, dtype=torch.long, device=self.device)
        self._pool = WindowPool(self._new_window, capacity=lambda rows: 1 << (rows - 1).bit_length())

    def _new_window(self, B: int):
        window = self.model.empty_window(B)
        if self.device.type == "cuda":  # CUDA-only: the graph writes these addresses in place
            for t in window:
                torch._dynamo.mark_static_address(t)
        return window

    @contextlib.contextmanager
    def _compiling(self, few_rows: bool):
        """The settings every call that may (re)compile runs under.

        - dynamo keeps its compiled graphs per code object, shared by every backend in the
          process, and recompiles per batch size (and per model): its default limit of 8
          graphs per function would make the ninth a hard error under ``fullgraph=True``.
        - on the CPU, ``inductor_cpu.cpu_options``: frozen weights and, for the graphs of a
          few rows (decode, score), inductor's C++ GEMM template.
        """
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch._dynamo.config.patch({_RECOMPILE_LIMIT: RECOMPILE_LIMIT}))
            if self.device.type == "cpu":
                stack.enter_context(torch._inductor.config.patch(cpu_options(few_rows)))
            yield

    def _empty(self, B: int):
        return self._pool.lend(B)

    @torch.no_grad()
    def _forward(self, rows, state, every):
        # Fresh contiguous rows: a compiled graph guards on strides and storage offset, and
        # the loop passes views (a verify step's last column), which .contiguous() keeps.
        window = state.cache.tensors
        B, (K, start), spare = rows.size(0), (rows.size(1), state.length), window[0].size(0) - rows.size(0)
        mask = state.mask
        if spare:  # dummy rows up to the window's capacity: ones, so each sees itself alone
            rows = torch.cat([rows, rows.new_zeros(spare, K)])
            mask = torch.cat([mask, mask.new_ones(spare, mask.size(1))])
        rows = rows.to(self.device, copy=True, memory_format=torch.contiguous_format)
        with self._compiling(few_rows=K == 1 or every):
            if K == 1:
                self._pos1.fill_(start)
                logits = self._decode(self.model, rows, self._pos1, window, mask, self._positions[:1])
                if self.device.type == "cuda":  # the CUDA graph's output buffer is reused
                    logits = logits.clone()
            else:
                input_pos = self._positions[start:start + K]
                index = self._positions[:K] if every else self._positions[K - 1:K]
                for t in (rows, input_pos, index):
                    torch._dynamo.maybe_mark_dynamic(t, t.dim() - 1)
                step = self._score if every else self._prefill
                logits = step(self.model, rows, input_pos, window, mask, index)
        return logits[:B].float(), state.cache

    def _take(self, window, rows, start, length, mask):
        return self._pool.take(window, rows, start, length)

    def _stack(self, parts, length, mask):
        return self._pool.stack(parts, length)
