"""Checkpoint files: atomic writes, safe loads, an explicit format.

A checkpoint is a dict saved with ``torch.save`` and loaded with ``weights_only=True`` (so a
file from a stranger cannot run code). Its ``kind`` says what it holds:
- ``"train"``  (``ckpt.pt``): weights + optimizer, scaler, RNG states, step, ... (resumable)
- ``"weights"`` (``best.pt``): weights + model config + tokenizer name + step + val loss.
Nothing is guessed from file names.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from slm_export.config import GPTConfig
from slm_export.errors import SlmError, first_line

FORMAT = "slm-export-checkpoint"
VERSION = 1
KINDS = ("train", "weights")


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remove_stale_temps(path: str | os.PathLike, tags: tuple[str, ...] = ("tmp",)) -> None:
    """Delete ``.<name>.<tag><pid>`` leftovers of ``path`` whose process is gone.

    A process killed mid-write (SIGKILL, power loss) leaves its temp file or staging folder
    behind under its own pid; the next writer of the same path removes it.
    """
    import shutil

    path = Path(path)
    for tag in tags:
        prefix = f".{path.name}.{tag}"
        for stale in path.parent.glob(f"{prefix}*"):
            pid = stale.name[len(prefix):]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename over ``path``.

    A crash (or a full disk) at any moment leaves either the old file or the new one,
    never a partial file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically save a checkpoint dict (which must carry ``kind`` and ``model_config``)."""
    assert payload.get("kind") in KINDS and "model_config" in payload
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
        first = first_line(e)
        raise SlmError(f"checkpoint is truncated or corrupt: {path} ({first[:120]})") from None
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
