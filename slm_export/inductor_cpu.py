"""The inductor settings on the CPU that the ``compiled`` backend and the AOTInductor export share.

- ``freezing``: the inference-only weights are folded into the graph as constants, which lets
  inductor pre-pack them for its matmul kernels. Inductor freezes a graph compiled with grad
  off only: the callers compile under ``torch.no_grad()``.
- Inductor's own C++ GEMM template (``max_autotune`` with the ``CPP`` backend only) for graphs
  that multiply a few rows at a time (a decode step, a speculative verify step), instead of
  inductor's default (MKL's packed GEMM for a frozen linear with a fixed row count, oneDNN's
  for a dynamic one), which is slow at a handful of rows on the lm_head's shape. With one
  backend listed there is nothing to benchmark: the template is chosen, at the cost of
  compiling its kernels (seconds per graph). Its kernels split their work for the torch
  thread count at compile time: right with any count at run time, at most that many
  threads working. It needs a vector ISA (AVX2,
  AVX-512, NEON) to be fast: without one the settings leave it out.
"""

from __future__ import annotations

import functools


@functools.cache
def cpp_gemm_available() -> bool:
    """Whether inductor has a vector ISA on this CPU (its C++ GEMM template needs one)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return bool(pick_vec_isa())


def cpu_options(few_rows: bool) -> dict:
    """Inductor config for a CPU graph; ``few_rows``: its matmuls have a handful of rows."""
    options = {"freezing": True}
    if few_rows and cpp_gemm_available():
        options.update(max_autotune=True, max_autotune_gemm_backends="CPP")
    return options
