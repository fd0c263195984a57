"""The inductor settings on the CPU that the ``compiled`` backend and the AOTInductor export share.

- ``freezing``: the inference-only weights are folded into the graph as constants, which lets
  inductor pre-pack them for its matmul kernels.
- Inductor's own C++ GEMM template (``max_autotune`` with the ``CPP`` backend only) for graphs
  that multiply a few rows at a time (a decode step, a speculative verify step): MKL's packed
  GEMM, inductor's default for a frozen linear, is slow at 2-8 rows on this shape (the 30m
  lm_head: 12.9 ms at 8 rows against 4.5 ms with the template, 2 threads; bench/RESULTS.md has
  the effect on the backends). With one backend listed there is nothing to benchmark: the
  template is chosen, at the cost of compiling its kernels (+6 s a graph on the 30m model).
  Its kernels are partitioned for the torch thread count at compile time (correct with other
  counts, fastest with that one). It exists where inductor vectorizes (AVX2, AVX-512, NEON):
  elsewhere the settings leave it out rather than ask inductor for a template it cannot build.
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
