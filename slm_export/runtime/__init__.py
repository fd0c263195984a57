"""Runtime backends behind one interface (``base.Backend``) and the one generation loop.

``load_backend(name, path, device, variant, **options)`` builds any backend of the registry
(``slm_export.registry``) from a user-facing path: a checkpoint file or run folder for the
torch backends (eager, compiled, naive), an export folder (or a run folder holding
``export/``) for the others. ``options`` go to the backend's own constructor (ort:
``threads``, ``vocab_ids``).
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path

import torch

from slm_export import registry
from slm_export.artifacts.manifest import MANIFEST, Manifest
from slm_export.errors import SlmError
from slm_export.runtime.base import Backend, State, host_threads
from slm_export.runtime.generation import (
    OVERFLOW_POLICIES,
    Generation,
    Stats,
    TokenStream,
    generate,
)
from slm_export.runtime.sampling import GREEDY, SamplingConfig, make_generator, sample
from slm_export.runtime.text import TextDecoder

__all__ = [
    "GREEDY", "OVERFLOW_POLICIES", "Backend", "Generation", "SamplingConfig", "State", "Stats",
    "TextDecoder", "TokenStream", "backend_for_model", "generate", "host_threads", "load_backend",
    "make_generator", "resolve_model_path", "sample",
]

CHECKPOINT = "best.pt"


def resolve_model_path(backend: str, path: str | os.PathLike) -> Path:
    """The checkpoint file (torch backends) or export folder (the others) that ``path`` names.

    Accepted: a checkpoint file; a run folder (its ``best.pt`` / ``export/``); an export
    folder (for the torch backends: the ``best.pt`` of the run folder around it).
    """
    spec = registry.backend(backend)
    path = Path(path)
    if not path.exists():
        raise SlmError(f"model not found: {path} (train one with `python train.py`, "
                       "or pass --model CHECKPOINT_OR_EXPORT_FOLDER)")
    if spec.from_checkpoint:
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


def _backend_class(spec: registry.BackendSpec):
    module, _, cls = spec.impl.partition(":")
    return getattr(importlib.import_module(module), cls)


def _build(spec: registry.BackendSpec, first, *args, **options) -> Backend:
    """The backend's class called with ``options``; an option it does not take is one line."""
    cls = _backend_class(spec)
    taken = inspect.signature(cls).parameters
    stray = [name for name in options if name not in taken]
    if stray:
        raise SlmError(f"backend {spec.name} takes no option {stray[0]!r}")
    return cls(first, *args, **options)


def backend_for_model(name: str, model: torch.nn.Module, **options) -> Backend:
    """A torch backend (one that loads a checkpoint) around an already loaded GPT."""
    spec = registry.backend(name)
    if not spec.from_checkpoint:
        torch_backends = [s.name for s in registry.BACKENDS.values() if s.from_checkpoint]
        raise SlmError(f"backend {name!r} does not run a torch model; "
                       f"choose one of {', '.join(torch_backends)}")
    return _build(spec, model, **options)


def load_backend(name: str, path: str | os.PathLike, device: torch.device | str = "cpu",
                 variant: str = "fp32", **options) -> Backend:
    """Build backend ``name`` from a checkpoint / run / export path on ``device``.

    An export backend loads the manifest's file of its kind and ``variant``, after checking
    that file's SHA-256 (the folder's other files are not hashed).
    """
    from slm_export.checkpoint import load_model

    device = torch.device(device)
    spec = registry.check_variant(name, variant)
    target = resolve_model_path(name, path)
    if spec.from_checkpoint:
        model, _ = load_model(target, device)
        return _build(spec, model, **options)
    manifest = Manifest.read(target, verify_hashes=False)
    return _build(spec, manifest.file(spec.loads, variant), manifest.config, device, **options)
