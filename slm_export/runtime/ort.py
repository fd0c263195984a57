"""ort: ONNX Runtime on the exported ``model_kv.onnx`` (or its int8 / fp16 variant).

Inputs ``input_ids`` (B, T) int64, ``past_key_values`` (L, 2, B, nh, P, hs) (P may be 0),
``attention_mask`` (B, P+T) int64; outputs ``logits`` (B, V), ``present_key_values``.

Every call goes through IO binding on every device: inputs and outputs are torch tensors
bound by pointer, so ORT reads the cache where it lies and writes logits and the grown
cache straight into tensors we allocated (no copy into numpy and back). The code that runs
on a GPU is the code CI runs on the CPU; only the device string and the stream differ.

On CUDA (not exercised in CI; tests/test_runtime.py::test_cuda_greedy_parity runs it on a
GPU), ORT runs on a dedicated torch stream passed as its ``user_compute_stream`` (PyTorch's
default stream has handle 0, which ORT takes for "no stream" and would then run on a stream
of its own that does not wait for ours). Before each run that stream waits for the current
one, where the inputs were written; ORT synchronizes its stream at the end of a run, so
outputs are complete when ``run_with_iobinding`` returns.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from slm_export.artifacts.loaders import ort_session
from slm_export.config import GPTConfig
from slm_export.errors import SlmError
from slm_export.model import empty_kv
from slm_export.runtime.base import State, check_prefill, decode_rows, window_mask

INPUTS = ("input_ids", "past_key_values", "attention_mask")
OUTPUTS = ("logits", "present_key_values")
ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
             "tensor(int64)": torch.int64}
NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


class OrtBackend:
    name = "ort"

    def __init__(self, path: str | os.PathLike, config: GPTConfig,
                 device: torch.device | str = "cpu", threads: int | None = None):
        self.config, self.path = config, path
        self.device = torch.device(device)
        self._stream = None
        providers = None
        if self.device.type == "cuda":  # CUDA-only (see the module docstring)
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            self._stream = torch.cuda.Stream(self.device)
            providers = [("CUDAExecutionProvider", {
                "device_id": index, "has_user_compute_stream": "1",
                "user_compute_stream": str(self._stream.cuda_stream)}), "CPUExecutionProvider"]
        self.session = ort_session(path, providers, threads)
        if self._stream is not None and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # ORT falls back to the CPU silently when its CUDA libraries do not load.
            raise SlmError(f"ONNX Runtime could not start its CUDA provider for {path} "
                           f"(it runs on {self.session.get_providers()}); run `slm-doctor`")
        types = {v.name: v.type for v in [*self.session.get_inputs(), *self.session.get_outputs()]}
        if not set(INPUTS + OUTPUTS) <= types.keys():
            raise SlmError(f"{path} is not a KV-cache model (inputs and outputs: {sorted(types)})")
        self._kv_dtype = ORT_TYPES[types["past_key_values"]]
        self._logits_dtype = ORT_TYPES[types["logits"]]
        self._binding = self.session.io_binding()
        self._ort_device = "cuda" if self.device.type == "cuda" else "cpu"

    def _bind(self, name: str, t: torch.Tensor, output: bool = False) -> None:
        args = (name, self._ort_device, self.device.index or 0, NUMPY_TYPES[t.dtype],
                tuple(t.shape), t.data_ptr())
        (self._binding.bind_output if output else self._binding.bind_input)(*args)

    def _run(self, ids: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor):
        """One graph call: ids (B, T) after kv (.., P, ..) -> (logits (B, V) fp32, present)."""
        c = self.config
        B, T = ids.shape
        ids, mask = ids.contiguous(), mask.contiguous()
        logits = torch.empty(B, c.vocab_size, dtype=self._logits_dtype, device=self.device)
        present = torch.empty(c.n_layer, 2, B, c.n_head, kv.size(4) + T, c.head_dim,
                              dtype=self._kv_dtype, device=self.device)
        for name, tensor in zip(INPUTS, (ids, kv, mask), strict=True):
            self._bind(name, tensor)
        self._bind("logits", logits, output=True)
        self._bind("present_key_values", present, output=True)
        if self._stream is not None:  # CUDA-only: ORT's stream waits for our inputs
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        self.session.run_with_iobinding(self._binding)
        return logits.float(), present

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        check_prefill(ids, self.config.block_size)
        B, T = ids.shape
        mask = window_mask(attention_mask, B, self.config.block_size, self.device, always=True)
        empty = empty_kv(self.config, B, self.device, self._kv_dtype)
        logits, kv = self._run(ids.to(self.device), empty, mask[:, :T])
        return logits, State(T, (kv, mask))

    def decode(self, tokens: torch.Tensor, state: State):
        rows = decode_rows(tokens, state, self.config.block_size)
        kv, mask = state.cache
        n = state.length + rows.size(1)
        logits, kv = self._run(rows.to(self.device), kv, mask[:, :n])
        return logits, State(n, (kv, mask))
