"""ort: ONNX Runtime on the exported cache graph ``onnx/model.onnx`` (or a reduced variant:
``model.fp16.onnx``, ``model.int8.onnx``, ``model.int4.onnx``).

The graph's signature is ``artifacts/kv_layout.py`` (per-layer past / present, position ids,
``logits_to_keep``). Every call goes through IO binding on every device: inputs and outputs
are torch tensors bound by pointer, so ORT reads the cache where it lies and writes logits
and the grown cache straight into tensors we allocated (no copy into numpy and back). The
code that runs on a GPU is the code CI runs on the CPU; only the device and the stream
differ.

On CUDA (not exercised in CI; tests/test_runtime.py::test_cuda_greedy_parity runs it on a
GPU), ORT runs on a dedicated torch stream passed as its ``user_compute_stream`` (PyTorch's
default stream has handle 0, which ORT takes for "no stream" and would then run on a stream
of its own that does not wait for ours). Before each run that stream waits for the current
one, where the inputs were written; ORT synchronizes its stream at the end of a run, so
outputs are complete when ``run_with_iobinding`` returns.
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import torch

from slm_export.artifacts import kv_layout
from slm_export.artifacts.loaders import (
    CudaProviderError,
    cpu_fallback,
    ort_cuda_problem,
    ort_session,
)
from slm_export.config import GPTConfig
from slm_export.errors import SlmError
from slm_export.runtime.graph import GraphBackend

ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
             "tensor(int64)": torch.int64}
NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


class OrtBackend(GraphBackend):
    name = "ort"
    dense_cache = True  # bound by pointer
    # A generation on this backend runs with one torch thread on the CPU (base.host_threads):
    # ORT's own pool does the arithmetic and keeps spinning on the cores between runs, and
    # torch's OpenMP workers (woken by the loop's sampling and copies) would then compete
    # with it for the same cores.
    host_threads: int | None = 1

    def __init__(self, path: str | os.PathLike, config: GPTConfig,
                 device: torch.device | str = "cpu", threads: int | None = None,
                 vocab_ids: torch.Tensor | None = None, tf32: bool = False):
        """``threads``: ORT's intra-op threads (default torch's count). ``vocab_ids``: score
        only these tokens (a draft model's vocabulary, ``runtime.draft_vocab``):
        logits[..., i] is token vocab_ids[i]. ``tf32``: let the CUDA provider run fp32
        matmuls in TF32 (its own default; off here, so fp32 files give eager's logits
        within the export's tolerance and the same greedy tokens)."""
        self.tf32 = tf32
        self.config, self.path = config, path
        self.device = torch.device(device)
        self._stream = None
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            providers = self._cuda_providers()
            self.host_threads = None  # the loop's work runs on the GPU
        source = path
        self.vocab_ids, self.logits_width = None, config.vocab_size
        if vocab_ids is not None:
            import onnx

            from slm_export.runtime.draft_vocab import check_restricted, restrict_lm_head

            full = onnx.load(str(path))
            graph = restrict_lm_head(onnx.load(str(path)), vocab_ids, config.vocab_size)
            source = graph.SerializeToString()
            check_restricted(full, source, vocab_ids, config, path)
            self.vocab_ids, self.logits_width = vocab_ids.to(self.device), len(vocab_ids)
        self.session = ort_session(source, providers, threads)
        self._check_providers(path, providers[0])
        self._check_signature(path)
        self._binding = self.session.io_binding()
        self._where = ("cuda" if self.device.type == "cuda" else "cpu", self.device.index or 0)
        self._keep_one = torch.ones((), dtype=torch.long)  # logits_to_keep: the last position

    def _cuda_providers(self) -> list:
        """CUDA-only (CI checks the diagnosis, tests/test_runtime.py::test_cuda_greedy_parity
        the rest on a GPU): the provider list for ORT's CUDA provider on our own stream."""
        import onnxruntime as ort

        with contextlib.redirect_stdout(io.StringIO()):  # it prints each library it misses
            ort.preload_dlls()  # the NVIDIA libraries of pip's nvidia-* packages, if any
        problem = ort_cuda_problem()
        if problem:
            raise CudaProviderError(problem)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self._stream = torch.cuda.Stream(self.device)
        options = cuda_provider_options(index, self._stream.cuda_stream, self.tf32)
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]

    def _check_providers(self, path, preferred) -> None:
        """Loud where ONNX Runtime would quietly run on the CPU: a provider that did not start,
        or arithmetic left on the CPU under it (``cpu_fallback``; the same check runs on every
        device, and is empty on the CPU)."""
        preferred = preferred if isinstance(preferred, str) else preferred[0]
        if self.session.get_providers()[0] != preferred:
            raise CudaProviderError(f"ONNX Runtime did not start {preferred} for {path} "
                                    f"(it runs on {self.session.get_providers()}); run slm-doctor")
        fallback = cpu_fallback(self.session, preferred)
        if fallback:
            ops = ", ".join(f"{op} x{n}" for op, n in fallback.items())
            hint = ("; the int8 file's dynamic quantization has no CUDA kernels: use --variant "
                    "fp16 on CUDA" if "MatMulInteger" in fallback else "")
            raise CudaProviderError(f"ONNX Runtime would run {ops} of {path} on the CPU under "
                                    f"{preferred}{hint}")

    def _check_signature(self, path) -> None:
        values = [*self.session.get_inputs(), *self.session.get_overridable_initializers(),
                  *self.session.get_outputs()]
        types = {v.name: v.type for v in values}
        L = self.config.n_layer
        missing = set(kv_layout.input_names(L) + kv_layout.output_names(L)) - types.keys()
        if missing:
            raise SlmError(f"{path} is not a cache graph of this layout (no {sorted(missing)[0]}; "
                           "files from slm-export < 0.2 need a re-export)")
        self.kv_dtype = ORT_TYPES[types["past_key_values.0.key"]]
        self._logits_dtype = ORT_TYPES[types["logits"]]

    def _bind(self, name: str, t: torch.Tensor, output: bool = False, where=None) -> None:
        device, index = where or self._where
        args = (name, device, index, NUMPY_TYPES[t.dtype], tuple(t.shape), t.data_ptr())
        (self._binding.bind_output if output else self._binding.bind_input)(*args)

    def _run(self, ids: torch.Tensor, past: tuple, mask: torch.Tensor, pos: torch.Tensor,
             keep: int = 1):
        """One graph call for ids (B, T) after ``past`` -> (logits (B, keep, V) fp32, present).

        ``mask`` (B, P+T) and ``pos`` (B, T) are the window's views for this call."""
        c = self.config
        B, T = ids.shape
        total = past[0].size(2) + T
        logits = torch.empty(B, keep, self.logits_width, dtype=self._logits_dtype, device=self.device)
        present = [torch.empty(B, c.n_head, total, c.head_dim, dtype=self.kv_dtype,
                               device=self.device) for _ in past]
        tokens = [t.contiguous() for t in (ids, mask, pos)]  # alive until the run: bound by pointer
        for name, t in zip(kv_layout.TOKEN_INPUTS, tokens, strict=True):
            self._bind(name, t)
        for name, t in zip(kv_layout.past_names(c.n_layer), past, strict=True):
            self._bind(name, t)
        keep_t = self._keep_one if keep == 1 else torch.tensor(keep)
        self._bind(kv_layout.LOGITS_TO_KEEP, keep_t, where=("cpu", 0))
        for name, t in zip(kv_layout.output_names(c.n_layer), (logits, *present), strict=True):
            self._bind(name, t, output=True)
        if self._stream is not None:  # CUDA-only: ORT's stream waits for our inputs
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        self.session.run_with_iobinding(self._binding)
        return logits.float(), tuple(present)


def cuda_provider_options(device_id: int, stream: int, tf32: bool = False) -> dict[str, str]:
    """The CUDA provider's options: our device, our torch stream as its compute stream (see
    the module docstring), and TF32 for fp32 matmuls only if asked for (``use_tf32`` is on
    by default in ONNX Runtime, which moves fp32 logits by ~1e-4)."""
    return {"device_id": str(device_id), "has_user_compute_stream": "1",
            "user_compute_stream": str(stream), "use_tf32": "1" if tf32 else "0"}
