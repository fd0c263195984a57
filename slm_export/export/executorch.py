"""ExecuTorch export: ``model_kv.pte`` (and ``model_kv.int8.pte``), PyTorch's on-device path
for phones and edge boards.

The static-cache graph AOTInductor compiles (``StaticKVModule``, the signature in
``artifacts/kv_layout.py``: input_ids, attention_mask, input_pos, logits_index, the caller's
windows) goes through ``torch.export`` and ExecuTorch's ``to_edge_transform_and_lower`` with
the XNNPACK partitioner: one row (``BATCH``), sequence and kept positions 1..block_size
dynamic (the example inputs are the largest: ExecuTorch sizes its planned memory by them). ExecuTorch
returns the windows it wrote as outputs (it does not write the caller's tensors in place), so
the runtime backend keeps them from call to call. The model config, tokenizer and versions
are compiled in as a constant method (``metadata``: a JSON string) and recorded, with the
file's SHA-256, in the manifest. The 8-bit file comes from ExecuTorch's own quantization
flow: PT2E with the XNNPACK quantizer, weights per channel and activations quantized on the
fly (dynamic int8), held to the same quality gate as the ONNX int8 file.

A phone app loads the ``.pte`` with ExecuTorch's C++ runtime (``Module`` / ``Program``, the
XNNPACK backend linked in); ``runtime/executorch.py`` runs it here through ExecuTorch's Python
bindings. Needs the optional ``edge`` extra (``pip install 'slm-export[edge]'``).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from slm_export.artifacts.files import atomic_write
from slm_export.artifacts.manifest import Provenance
from slm_export.errors import SlmError, first_line
from slm_export.export.signatures import StaticKVModule, static_kv_inputs
from slm_export.runtime import executorch as runtime_et
from slm_export.runtime.executorch import METADATA_METHOD, quiet

FILE = "model_kv.pte"
VARIANTS = ("fp32", "int8")  # what this format writes: fp32 always, int8 where asked
# One row: ExecuTorch's memory plan took a dynamic batch dimension as static in places
# (executorch 1.5.1: "Attempted to resize a static tensor" at batch 3 of a batch-4 export); a
# phone serves one sequence; the runtime backend runs a batch row by row.
BATCH = 1


def file_name(variant: str) -> str:
    return FILE if variant == "fp32" else FILE.replace(".pte", f".{variant}.pte")


def require() -> None:
    """Raise unless ExecuTorch is installed (``runtime/executorch.py``'s ``problem``)."""
    if reason := runtime_et.problem():
        raise SlmError(f"--format executorch needs ExecuTorch: {reason}")


def _program(model: torch.nn.Module) -> torch.export.ExportedProgram:
    from torch.export import Dim

    c = model.config
    seq, kept = Dim("sequence", min=1, max=c.block_size), Dim("kept", min=1, max=c.block_size)
    dynamic = ({1: seq}, None, {0: seq}, {0: kept}, tuple(None for _ in range(2 * c.n_layer)))
    with torch.no_grad():
        return torch.export.export(StaticKVModule(model), _largest_inputs(c), dynamic_shapes=dynamic,
                                   strict=False)


def _largest_inputs(config) -> tuple:
    return static_kv_inputs(config, batch=BATCH, seq=config.block_size, kept=config.block_size)


def _quantized(model: torch.nn.Module) -> torch.export.ExportedProgram:
    """The program after PT2E dynamic int8 quantization (XNNPACK's quantizer), calibrated on
    one call (dynamic activations need no calibration statistics)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    prepared = prepare_pt2e(_program(model).module(), quantizer)
    inputs = _largest_inputs(model.config)
    with torch.no_grad():
        prepared(*inputs)
    converted = convert_pt2e(prepared)
    c = model.config
    from torch.export import Dim

    seq, kept = Dim("sequence", min=1, max=c.block_size), Dim("kept", min=1, max=c.block_size)
    dynamic = ({1: seq}, None, {0: seq}, {0: kept}, tuple(None for _ in range(2 * c.n_layer)))
    with torch.no_grad():
        return torch.export.export(converted, inputs, dynamic_shapes=dynamic, strict=False)


def export(model: torch.nn.Module, provenance: Provenance, folder: str | os.PathLike,
           variants: tuple[str, ...] = ("fp32",)) -> dict[str, tuple[str, str]]:
    """Write ``model_kv.pte`` (and the int8 file where asked) into ``folder``;
    -> {file name: (kind, variant)}."""
    require()
    try:
        with quiet():
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower
    except ImportError as e:  # installed but broken (a torch it was not built for)
        raise SlmError(f"--format executorch: ExecuTorch does not import ({first_line(e)})") from None

    written = {}
    model = copy.deepcopy(model).cpu().eval()
    for variant in ("fp32", *[v for v in variants if v != "fp32"]):
        metadata = json.dumps(provenance.file_metadata("executorch_kv", variant), sort_keys=True)
        try:
            with quiet():
                program = _program(model) if variant == "fp32" else _quantized(model)
                lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                                      constant_methods={METADATA_METHOD: metadata})
                data = lowered.to_executorch().buffer
        except Exception as e:  # torch.export and ExecuTorch raise many types; keep one line
            raise SlmError(f"ExecuTorch export ({variant}) failed ({type(e).__name__}: "
                           f"{first_line(e)})") from None
        atomic_write(Path(folder) / file_name(variant), lambda f, d=data: f.write(d))
        written[file_name(variant)] = ("executorch_kv", variant)
    return written
