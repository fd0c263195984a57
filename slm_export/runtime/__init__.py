"""Runtime backends behind one interface (``base.Backend``) and the one generation loop.

``load_backend(name, path, device)`` builds any backend from a user-facing path: a
checkpoint file or run folder for the torch backends (eager, compiled, naive), an export
folder (or a run folder holding ``export/``) for torchscript, ort and aoti.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from slm_export.artifacts.manifest import MANIFEST, Manifest
from slm_export.errors import SlmError
from slm_export.runtime.base import (
    BACKENDS,
    EXPORT_BACKENDS,
    TORCH_BACKENDS,
    Backend,
    StaleStateError,
    State,
)
from slm_export.runtime.generation import (
    OVERFLOW_POLICIES,
    Generation,
    Stats,
    TextDecoder,
    TokenStream,
    generate,
)
from slm_export.runtime.sampling import GREEDY, SamplingConfig, make_generator, sample

__all__ = [
    "BACKENDS", "EXPORT_BACKENDS", "GREEDY", "OVERFLOW_POLICIES", "TORCH_BACKENDS", "Backend",
    "Generation", "SamplingConfig", "StaleStateError", "State", "Stats", "TextDecoder",
    "TokenStream",
    "backend_for_model", "generate", "load_backend", "make_generator", "resolve_model_path",
    "sample",
]

CHECKPOINT = "best.pt"


def resolve_model_path(backend: str, path: str | os.PathLike) -> Path:
    """The file (torch backends) or export folder (torchscript, ort, aoti) that ``path`` names.

    Accepted: a checkpoint file; a run folder (its ``best.pt`` / ``export/``); an export
    folder (for the torch backends: the ``best.pt`` of the run folder around it).
    """
    if backend not in BACKENDS:
        raise SlmError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(path)
    if not path.exists():
        raise SlmError(f"model not found: {path} (train one with `python train.py`, "
                       "or pass --model CHECKPOINT_OR_EXPORT_FOLDER)")
    if backend in TORCH_BACKENDS:
        if path.is_file():
            return path
        if (path / CHECKPOINT).is_file():
            return path / CHECKPOINT
        if (path / MANIFEST).is_file() and (path.parent / CHECKPOINT).is_file():
            return path.parent / CHECKPOINT  # an export folder inside its run folder
        raise SlmError(f"no {CHECKPOINT} in {path}; pass a checkpoint file with --model")
    if path.is_file():
        if (path.parent / MANIFEST).is_file():
            return path.parent
        raise SlmError(f"backend {backend} needs an export folder, not the file {path} "
                       "(run `python export.py` first)")
    for candidate in (path, path / "export"):
        if (candidate / MANIFEST).is_file():
            return candidate
    raise SlmError(f"no export in {path} (no {MANIFEST} there or in {path / 'export'}); "
                   "run `python export.py` first")


def backend_for_model(name: str, model: torch.nn.Module) -> Backend:
    """A torch backend around an already loaded GPT."""
    if name == "eager":
        from slm_export.runtime.eager import EagerBackend

        return EagerBackend(model)
    if name == "naive":
        from slm_export.runtime.naive import NaiveBackend

        return NaiveBackend(model)
    if name == "compiled":
        from slm_export.runtime.compiled import CompiledBackend

        return CompiledBackend(model)
    raise SlmError(f"backend {name!r} does not run a torch model; "
                   f"choose one of {', '.join(TORCH_BACKENDS)}")


def load_backend(name: str, path: str | os.PathLike, device: torch.device | str = "cpu",
                 variant: str = "fp32", threads: int | None = None,
                 vocab_ids: torch.Tensor | None = None) -> Backend:
    """Build backend ``name`` from a checkpoint / run / export path on ``device``.

    An export backend loads the manifest's file of its kind and ``variant``, after checking
    that file's SHA-256 (the folder's other files are not hashed). ``vocab_ids`` (ort only):
    logits of these tokens only (a draft model's vocabulary, ``runtime.draft_vocab``).
    """
    from slm_export.checkpoint import load_model

    device = torch.device(device)
    target = resolve_model_path(name, path)
    if variant != "fp32" and name != "ort":
        raise SlmError(f"--variant {variant} applies to the ort backend only")
    if vocab_ids is not None and name != "ort":
        raise SlmError(f"a draft vocabulary needs an ort draft (--draft-backend ort), not {name}")
    if name in TORCH_BACKENDS:
        model, _ = load_model(target, device)
        return backend_for_model(name, model)
    manifest = Manifest.read(target, verify_hashes=False)
    if name == "torchscript":
        from slm_export.runtime.torchscript import TorchScriptBackend

        return TorchScriptBackend(manifest.file("torchscript_kv"), manifest.config, device)
    if name == "aoti":
        from slm_export.runtime.aoti import AotiBackend

        return AotiBackend(manifest.file("aoti_kv"), manifest.config, device)
    from slm_export.runtime.ort import OrtBackend

    return OrtBackend(manifest.file("onnx_kv", variant), manifest.config, device, threads, vocab_ids)
