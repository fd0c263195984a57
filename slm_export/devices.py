"""Device and dtype selection, decided once at run time."""

from __future__ import annotations

import re

import torch

from slm_export.errors import SlmError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; "cpu", "cuda" or "cuda:N" as asked, and asking
    for a CUDA device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise SlmError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SlmError(f"--device {name} requested but no CUDA device is available")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise SlmError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                           "CUDA device(s)")
    return torch.device(name)


def bf16_support(device: torch.device) -> str:
    """"native" on GPUs with bfloat16 tensor cores (compute capability >= 8.0: Ampere and later;
    ROCm), "emulated" where torch can still run bf16 (slowly, e.g. RTX 20xx / GTX 16xx, whose
    ``torch.cuda.is_bf16_supported()`` says True), "none" otherwise and on the CPU.

    Asks about ``device`` itself, not the current CUDA device.
    """
    if device.type != "cuda":
        return "none"
    if torch.version.hip or torch.cuda.get_device_capability(device) >= (8, 0):
        return "native"
    return "emulated" if _bf16_runs_on(device) else "none"


def _bf16_runs_on(device: torch.device) -> bool:
    """The emulation probe of ``torch.cuda.is_bf16_supported()``, for this device (that
    function asks about the current device)."""
    try:
        torch.ones(1, dtype=torch.bfloat16, device=device)
        return True
    except Exception:  # CUDA raises RuntimeError or AcceleratorError, depending on the version
        return False
