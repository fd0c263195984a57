"""Checkpoint files: atomic writes, safe loads, an explicit format.

A checkpoint is a dict saved with ``torch.save`` and loaded with ``weights_only=True`` (so a
file from a stranger cannot run code). Its ``kind`` says what it holds:
- ``"train"``  (``ckpt.pt``): weights + optimizer, scaler, RNG states, step, ... (resumable)
- ``"weights"`` (``best.pt``): weights + model config + tokenizer name + step + val loss.
Nothing is guessed from file names.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from slm_export.artifacts.files import atomic_write
from slm_export.config import GPTConfig
from slm_export.errors import SlmError, first_line

FORMAT = "slm-export-checkpoint"
VERSION = 1
KINDS = ("train", "weights")


def save(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically save a checkpoint dict (which must carry ``kind`` and ``model_config``)."""
    if payload.get("kind") not in KINDS or "model_config" not in payload:
        raise ValueError(f"a checkpoint payload needs kind in {KINDS} and model_config")
    payload = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write(path, lambda f: torch.save(payload, f))


def weights_payload(model: torch.nn.Module, config: GPTConfig, *, step: int = 0,
                    val_loss: float | None = None, tokenizer: str = "gpt2") -> dict[str, Any]:
    return {
        "kind": "weights",
        "model_config": config.to_dict(),
        "model": model.state_dict(),
        "tokenizer": tokenizer,
        "step": step,
        "val_loss": val_loss,
    }


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; every failure is a one-line ``SlmError``."""
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise SlmError(f"checkpoint is empty: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses globals it does not allow (functions, classes): that is a file
        # that would run or build arbitrary objects; anything else is a damaged file.
        if re.search(r"Unsupported global|GLOBAL ", str(e)):
            raise SlmError(f"refusing to load {path}: it references Python code or objects "
                           "beyond tensors and plain data (possible code execution)") from None
        raise SlmError(f"checkpoint is truncated or corrupt: {path}") from None
    except Exception as e:  # on garbage torch's unpickler fails with many types (IndexError, ...)
        raise SlmError(f"checkpoint is truncated or corrupt: {path} ({first_line(e, 120)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise SlmError(f"{path} is not an slm-export checkpoint")
    if ckpt.get("version") != VERSION:
        raise SlmError(f"{path}: unsupported checkpoint version {ckpt.get('version')!r}")
    if ckpt.get("kind") not in KINDS:
        raise SlmError(f"{path}: unknown checkpoint kind {ckpt.get('kind')!r}")
    return ckpt


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Build the GPT a checkpoint describes and load its weights: -> (model in eval mode, ckpt)."""
    from slm_export.model import GPT

    ckpt = load(path, map_location="cpu")
    config = GPTConfig.from_dict(ckpt["model_config"])
    model = GPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise SlmError(f"{path}: weights do not match its model config ({first[:160]})") from None
    return model.to(device).eval(), ckpt
