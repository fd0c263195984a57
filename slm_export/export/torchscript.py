"""TorchScript export: ``model.ts`` (all-position logits) and ``model_kv.ts`` (cache path).

We trace rather than script: ``forward_kv`` builds per-layer cache objects that TorchScript's
compiler rejects, while tracing records only tensor ops. Sizes read with ``.size()`` stay
symbolic in the trace, so batch, sequence and past lengths are dynamic; verification runs
the files on shapes the trace never saw (including an empty past). The tied embedding /
lm_head matrix is one storage and is saved once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from slm_export.artifacts.files import atomic_write
from slm_export.artifacts.loaders import TORCHSCRIPT_METADATA, quiet_jit
from slm_export.artifacts.manifest import Provenance
from slm_export.export.signatures import KVModule, LogitsModule, kv_inputs, logits_inputs
from slm_export.model import blocked_head


def trace(model: torch.nn.Module) -> tuple[torch.jit.ScriptModule, torch.jit.ScriptModule]:
    """-> (traced LogitsModule, traced KVModule), both fp32 on CPU, of a copy of ``model``
    whose tied embedding / lm_head is stored in vocabulary blocks (``model.blocked_head``:
    the faster lm_head on the CPU, saved once in that layout)."""
    model = blocked_head(model)
    config = model.config
    with quiet_jit(), torch.no_grad():
        # check_trace=False: verification runs the stronger check, on other shapes.
        logits = torch.jit.trace(LogitsModule(model), logits_inputs(config), check_trace=False)
        kv = torch.jit.trace(KVModule(model), kv_inputs(config), check_trace=False)
    return logits, kv


def save(module: torch.jit.ScriptModule, path: str | os.PathLike, metadata: dict) -> None:
    extra = {TORCHSCRIPT_METADATA: json.dumps(metadata, indent=2)}
    with quiet_jit():
        atomic_write(path, lambda f: torch.jit.save(module, f, _extra_files=extra))


def export(model: torch.nn.Module, provenance: Provenance,
           folder: str | os.PathLike) -> dict[str, str]:
    """Write model.ts and model_kv.ts into ``folder``; -> {file name: kind}."""
    logits, kv = trace(model)
    save(logits, Path(folder) / "model.ts", provenance.file_metadata("torchscript"))
    save(kv, Path(folder) / "model_kv.ts", provenance.file_metadata("torchscript_kv"))
    return {"model.ts": "torchscript", "model_kv.ts": "torchscript_kv"}
