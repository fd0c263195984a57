"""ort: ONNX Runtime on the exported ``model_kv.onnx`` (or its int8 variant).

Inputs ``input_ids`` (B, T) int64, ``past_key_values`` (L, 2, B, nh, P, hs) float32 (P may be
0), ``attention_mask`` (B, P+T) int64; outputs ``logits`` (B, V), ``present_key_values``.

Session options are set once: graph optimization ORT_ENABLE_ALL and the intra-op thread
count. On a usable CUDA device the CUDA execution provider runs on PyTorch's current
stream with IO binding: inputs, logits and the cache stay in torch CUDA tensors (bound by
pointer), so nothing crosses to the host but the sampled token ids. Elsewhere the CPU
provider exchanges numpy arrays, zero-copy into torch for sampling.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from slm_export.errors import SlmError, first_line
from slm_export.runtime.base import State, check_prefill, export_file, window_mask

INPUTS = ("input_ids", "past_key_values", "attention_mask")
OUTPUTS = ("logits", "present_key_values")


def session_options(threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only
    return so


class OrtBackend:
    name = "ort"

    def __init__(self, folder: str | os.PathLike, device: torch.device | str = "cpu",
                 variant: str = "fp32", threads: int | None = None, verify_hashes: bool = True):
        import onnxruntime as ort

        path, self.config = export_file(folder, "onnx_kv", variant, verify_hashes=verify_hashes)
        self.path, self.variant = path, variant
        device = torch.device(device)
        use_cuda = (device.type == "cuda" and torch.cuda.is_available()
                    and "CUDAExecutionProvider" in ort.get_available_providers())
        if use_cuda:
            index = device.index if device.index is not None else torch.cuda.current_device()
            device = torch.device("cuda", index)
            cuda_opts = {"device_id": index, "has_user_compute_stream": "1",
                         "user_compute_stream": str(torch.cuda.current_stream(device).cuda_stream)}
            providers = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads),
                                                providers=providers)
        except Exception as e:  # onnxruntime raises its own pybind types (Fail, InvalidProtobuf)
            first = first_line(e)
            raise SlmError(f"cannot load ONNX file {path} ({first[:160]})") from None
        names_in = {i.name for i in self.session.get_inputs()}
        names_out = {o.name for o in self.session.get_outputs()}
        if not (set(INPUTS) <= names_in and set(OUTPUTS) <= names_out):
            raise SlmError(f"{path} is not a KV-cache model (inputs {sorted(names_in)}, "
                           f"outputs {sorted(names_out)})")
        # ORT falls back to the CPU silently when the CUDA libraries are missing: ask it.
        self.on_cuda = use_cuda and self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = device if self.on_cuda else torch.device("cpu")
        self.providers = self.session.get_providers()
        if self.on_cuda:
            self._binding = self.session.io_binding()

    # -- one forward pass -------------------------------------------------------------------
    def _run_cpu(self, ids: torch.Tensor, kv: np.ndarray, mask: torch.Tensor):
        logits, present = self.session.run(OUTPUTS, {
            "input_ids": ids.numpy(), "past_key_values": kv,
            "attention_mask": np.ascontiguousarray(mask.numpy())})
        return torch.from_numpy(logits), present

    def _bind(self, name: str, t: torch.Tensor, output: bool = False):
        dtype = np.int64 if t.dtype == torch.long else np.float32
        args = (name, "cuda", t.device.index, dtype, tuple(t.shape), t.data_ptr())
        (self._binding.bind_output if output else self._binding.bind_input)(*args)

    def _run_cuda(self, ids: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor):
        c = self.config
        B, T = ids.shape
        ids, mask = ids.contiguous(), mask.contiguous()
        logits = torch.empty(B, c.vocab_size, dtype=torch.float32, device=self.device)
        present = torch.empty(c.n_layer, 2, B, c.n_head, kv.size(4) + T, c.head_dim,
                              dtype=torch.float32, device=self.device)
        self._bind("input_ids", ids)
        self._bind("past_key_values", kv)
        self._bind("attention_mask", mask)
        self._bind("logits", logits, output=True)
        self._bind("present_key_values", present, output=True)
        self.session.run_with_iobinding(self._binding)
        return logits, present

    def _run(self, ids, kv, mask):
        return self._run_cuda(ids, kv, mask) if self.on_cuda else self._run_cpu(ids, kv, mask)

    # -- the Backend interface --------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        check_prefill(ids, self.config.block_size)
        B, T = ids.shape
        ids = ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long)
        mask = window_mask(attention_mask.to(self.device), self.config.block_size, self.device)
        c = self.config
        shape = (c.n_layer, 2, B, c.n_head, 0, c.head_dim)
        if self.on_cuda:
            empty = torch.zeros(shape, dtype=torch.float32, device=self.device)
        else:
            empty = np.zeros(shape, dtype=np.float32)
        logits, kv = self._run(ids, empty, mask[:, :T])
        return logits, State(length=T, mask=mask, cache=kv)

    def decode(self, tokens: torch.Tensor, state: State):
        n = state.length + 1
        logits, state.cache = self._run(tokens.view(-1, 1), state.cache, state.mask[:, :n])
        state.length = n
        return logits, state
