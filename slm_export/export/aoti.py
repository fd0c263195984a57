"""AOTInductor export: ``model_kv.pt2``, the static-cache graph compiled ahead of time.

torch.export + AOTInductor (``torch._inductor.aoti_compile_and_package``) is what PyTorch
names as TorchScript's successor for serving without Python: the ``.pt2`` package holds a
compiled shared library and the weights, and ``torch._inductor.aoti_load_package`` (Python)
or ``torch::inductor::AOTIModelPackageLoader`` (C++, ``cpp/``) load it without compiling.

Why a static cache (``StaticKVModule``, signature in ``artifacts/kv_layout.py``): torch.export
specialises a dimension whose example size is 0 or 1, and the functional cache graph has an
empty past at every prefill. Here the caller owns a preallocated window per layer
(B, n_head, block_size, head_dim) that the graph writes in place at ``input_pos``: no
dimension is ever empty, one graph serves prefill (T >= 1 tokens from slot 0) and decode
(T = 1, or K tokens), and a decode step copies no cache. Batch, sequence and the number of
returned logits are exported from example sizes >= 2 with declared ranges starting at 1.
``logits_index`` picks the positions whose logits come back: the last one to sample from,
or all new ones to verify speculated tokens, without an lm_head over a whole prefill.

No full-sequence ``model.pt2``: it would be a second compile (as long again) and a second
copy of the weights for a graph no runtime here serves; ``model.ts`` / ``model.onnx`` give
all-position logits.

A package is compiled for the device it is exported on (``build(..., device=)``), for that
CPU's vector ISA, and against this torch's libtorch: it runs there, not elsewhere. On the CPU it
is compiled with ``inductor_cpu.cpu_options``: frozen weights and inductor's C++ GEMM template,
whose kernels split their work for the export's torch thread count and which stores the Linear
weights in its blocked layout; the tied embedding's matrix is kept as it is too (the package is
~1.7x the weights' size). Metadata
(model config, tokenizer, format, versions) is compiled into the package
(``get_metadata()`` in Python and C++) and recorded in the manifest with the file's SHA-256.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path

import torch

from slm_export.artifacts.files import atomic_write
from slm_export.artifacts.manifest import Provenance
from slm_export.errors import SlmError, first_line
from slm_export.export.signatures import StaticKVModule, static_kv_inputs
from slm_export.inductor_cpu import cpu_options

FILE = "model_kv.pt2"


def compiler_problem() -> str | None:
    """Why AOTInductor cannot compile here (no working C++ compiler), or None."""
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return "no working C++ compiler (AOTInductor runs g++, or $CXX)"
    return None


def cuda_toolkit_problem() -> str | None:
    """Why AOTInductor cannot compile a CUDA package here, or None: it compiles the package's
    wrapper against the CUDA toolkit's headers and its kernels with the toolkit's nvcc, which
    a driver plus pip's CUDA runtime wheels do not provide. torch finds the toolkit through
    CUDA_HOME / CUDA_PATH, nvcc on PATH, or /usr/local/cuda."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None:
        return ("no CUDA toolkit found (CUDA_HOME unset, no nvcc on PATH, no /usr/local/cuda): "
                "install NVIDIA's CUDA toolkit of torch's CUDA version and set CUDA_HOME")
    missing = [p for p in ("bin/nvcc", "include/cuda_runtime_api.h") if not (Path(home) / p).is_file()]
    if missing:
        return f"the CUDA toolkit at {home} has no {missing[0]}: set CUDA_HOME to a complete toolkit"
    return None


def require(device: torch.device | str = "cpu") -> None:
    problem = compiler_problem()
    if problem:
        raise SlmError(f"--format aoti needs a C++ compiler: {problem}")
    if torch.device(device).type == "cuda" and (problem := cuda_toolkit_problem()):
        raise SlmError(f"--format aoti --device cuda needs the CUDA toolkit: {problem}")


@contextlib.contextmanager
def _quiet():
    # torch's own pytree code warns about its internal LeafSpec use (torch 2.13): not ours.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", category=FutureWarning)
        yield


def export_program(model: torch.nn.Module, device: torch.device) -> torch.export.ExportedProgram:
    """torch.export of ``StaticKVModule`` with dynamic batch, sequence and kept positions."""
    from torch.export import Dim

    c = model.config
    batch = Dim("batch", min=1)
    seq, kept = Dim("sequence", min=1, max=c.block_size), Dim("kept", min=1, max=c.block_size)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch},
               "input_pos": {0: seq}, "logits_index": {0: kept},
               "cache": tuple({0: batch} for _ in range(2 * c.n_layer))}
    with torch.no_grad():
        return torch.export.export(StaticKVModule(model), static_kv_inputs(c, device=device),
                                   dynamic_shapes=dynamic, strict=False)


def export(model: torch.nn.Module, provenance: Provenance, folder: str | os.PathLike,
           device: torch.device | str = "cpu") -> dict[str, str]:
    """Compile ``model_kv.pt2`` for ``device`` into ``folder``; -> {file name: kind}."""
    device = torch.device(device)
    require(device)
    from torch._inductor import aoti_compile_and_package

    if device.type != "cpu":
        model = copy.deepcopy(model).to(device)
    options = {"aot_inductor.metadata": provenance.file_metadata("aoti_kv"),
               **(cpu_options(few_rows=True) if device.type == "cpu" else {})}
    try:  # grad off: inductor freezes (folds and pre-packs) the weights of such a graph only
        with _quiet(), torch.no_grad():
            program = export_program(model, device)
            atomic_write(Path(folder) / FILE, lambda f: aoti_compile_and_package(
                program, package_path=f, inductor_configs=options))
    except Exception as e:  # torch.export and inductor raise many types; keep the first line
        raise SlmError(f"AOTInductor export failed ({type(e).__name__}: {first_line(e)})") from None
    return {FILE: "aoti_kv"}
