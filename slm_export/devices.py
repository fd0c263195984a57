"""Device and dtype selection, decided once at run time."""

from __future__ import annotations

import torch

from slm_export.errors import SlmError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SlmError("--device cuda requested but no CUDA device is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise SlmError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)
