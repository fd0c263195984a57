"""executorch: the ExecuTorch file ``model_kv.pte`` (or ``model_kv.int8.pte``) through
ExecuTorch's Python runtime, XNNPACK kernels on the CPU.

The program is the static-cache graph of ``artifacts/kv_layout.py`` (``export/executorch.py``);
ExecuTorch hands the windows it wrote back as outputs, so each state keeps the windows of its
last call (a ``WindowPool`` that never reuses: the runtime allocates them). The program takes
one row: a batch runs row by row. A mask is always passed, as for aoti. Needs the optional
``edge`` extra.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import warnings

import torch

from slm_export.config import GPTConfig
from slm_export.errors import SlmError, first_line
from slm_export.runtime.base import Cached, Window, WindowPool

METADATA_METHOD = "metadata"  # the constant method with the model's JSON (export/executorch.py)


def problem() -> str | None:
    """Why ExecuTorch files cannot be written or run here (its package missing), or None. A
    lookup, not an import: importing ExecuTorch loads torchao, seconds and warnings."""
    if importlib.util.find_spec("executorch") is None:
        return "the executorch package is not installed: pip install 'slm-export[edge]'"
    return None


@contextlib.contextmanager
def quiet():
    """torchao and ExecuTorch announce optional CUDA kernels they did not load, and torch's
    pytree warns about their enums: not ours to act on."""
    names = ("torchao", "executorch", "torch._export", "torch.export", "torch.utils._pytree")
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


@contextlib.contextmanager
def native_stderr():
    """ExecuTorch's C++ runtime logs CPU probing to file descriptor 2 when a method loads (one
    line per /sys file it cannot read): hold that output, and hand it over (the yielded list
    gets its lines) so a failed load can name its cause."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines += held.read().decode(errors="replace").splitlines()


class ExecutorchBackend(Cached):
    name = "executorch"
    always_mask = True

    def __init__(self, path: str | os.PathLike, config: GPTConfig, device: torch.device | str = "cpu"):
        self.config, self.path, self.device = config, path, torch.device(device)
        if self.device.type != "cpu":
            raise SlmError(f"the executorch backend runs on the CPU (XNNPACK), not {self.device}")
        if reason := problem():
            raise SlmError(f"backend executorch: {reason}")
        try:
            with quiet(), native_stderr() as log:
                from executorch.runtime import Runtime

                program = Runtime.get().load_program(str(path))
                self.method = program.load_method("forward")
                self.metadata = json.loads(program.load_method(METADATA_METHOD).execute([])[0])
        except Exception as e:  # ExecuTorch raises RuntimeError / ValueError with long texts
            cause = next((line for line in reversed(log) if "rror" in line), "")
            raise SlmError(f"cannot load ExecuTorch program {path} ({first_line(e, 120)})"
                           + (f": {first_line(cause, 120)}" if cause else "")) from None
        self._positions = torch.arange(config.block_size)
        c = config
        self._pool = WindowPool(lambda B: tuple(torch.zeros(B, c.n_head, c.block_size, c.head_dim)
                                                for _ in range(2 * c.n_layer)), reuse=False)

    def _empty(self, B: int):
        return self._pool.lend(B)

    def _forward(self, rows, state, every):
        """The program takes one row: a batch runs row by row, each with its own window."""
        K, start = rows.size(1), state.length
        index = self._positions[:K] if every else self._positions[K - 1:K]
        pos, logits, windows = self._positions[start:start + K], [], []
        for b in range(rows.size(0)):
            outputs = self.method.execute([rows[b:b + 1].contiguous(), state.mask[b:b + 1].contiguous(),
                                           pos, index, *(t[b:b + 1] for t in state.cache.tensors)])
            *written, row_logits = outputs  # the windows it wrote first, as torch.export orders them
            logits.append(row_logits)
            windows.append(written)
        stacked = tuple(torch.cat(layer) for layer in zip(*windows, strict=True))
        return torch.cat(logits).float(), Window(stacked, state.batch)

    def _take(self, window, rows, start, length, mask):
        return self._pool.take(window, rows, start, length)

    def _stack(self, parts, length, mask):
        return self._pool.stack(parts, length)
