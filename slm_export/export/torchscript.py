"""TorchScript export: ``model.ts`` (all-position logits) and ``model_kv.ts`` (cache path).

We trace rather than script: ``forward_kv`` builds per-layer cache objects that TorchScript's
compiler rejects, while tracing records only tensor ops. Sizes read with ``.size()`` stay
symbolic in the trace, so batch, sequence and past lengths are dynamic; ``verify.py`` checks
that on shapes the trace never saw (including an empty past). The tied embedding / lm_head
matrix is one storage and is saved once.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch

from slm_export.artifacts.files import atomic_write
from slm_export.errors import SlmError, first_line
from slm_export.export import KVModule, LogitsModule
from slm_export.export.manifest import file_metadata

CONFIG_FILE = "config.json"  # the _extra_files entry holding file_metadata(...) as JSON


@contextlib.contextmanager
def quiet_jit():
    """Silence only torch.jit's own deprecation notice (torch >= 2.9), where we mean to use it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated",
                                category=DeprecationWarning)
        yield


def example_inputs(config, batch: int = 2, seq: int = 5, past: int = 3):
    """Trace inputs for the KV module: a non-empty past so the concat is recorded generally."""
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    kv = torch.zeros(config.n_layer, 2, batch, config.n_head, past, config.head_dim)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    return ids, kv, mask


def trace(model: torch.nn.Module) -> tuple[torch.jit.ScriptModule, torch.jit.ScriptModule]:
    """-> (traced LogitsModule, traced KVModule), both fp32 on CPU."""
    config = model.config
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with quiet_jit(), torch.no_grad():
        # check_trace=False: verify.py runs the stronger check, on other shapes.
        logits = torch.jit.trace(LogitsModule(model), (ids,), check_trace=False)
        kv = torch.jit.trace(KVModule(model), example_inputs(config), check_trace=False)
    return logits, kv


def save(module: torch.jit.ScriptModule, path: str | os.PathLike, metadata: dict) -> None:
    extra = {CONFIG_FILE: json.dumps(metadata, indent=2)}
    with quiet_jit():
        atomic_write(path, lambda f: torch.jit.save(module, f, _extra_files=extra))


def export(model: torch.nn.Module, ckpt: dict, folder: str | os.PathLike) -> dict[str, str]:
    """Write model.ts and model_kv.ts into ``folder``; -> {file name: kind}."""
    logits, kv = trace(model)
    save(logits, Path(folder) / "model.ts", file_metadata(ckpt, "torchscript"))
    save(kv, Path(folder) / "model_kv.ts", file_metadata(ckpt, "torchscript_kv"))
    return {"model.ts": "torchscript", "model_kv.ts": "torchscript_kv"}


def load(path: str | os.PathLike, map_location="cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """Load a TorchScript export -> (module in eval mode, its embedded metadata)."""
    extra = {CONFIG_FILE: ""}
    try:
        with quiet_jit():
            module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as e:
        first = first_line(e)
        raise SlmError(f"cannot load TorchScript file {path} ({first[:120]})") from None
    try:
        metadata = json.loads(extra[CONFIG_FILE])
    except json.JSONDecodeError:
        raise SlmError(f"{path} has no slm-export metadata ({CONFIG_FILE})") from None
    return module.eval(), metadata
