"""Opening exported files: the one TorchScript loader, the one AOTInductor package loader and
the one ONNX Runtime session builder.

The exporter (to verify what it wrote) and the runtime (to serve it) both open files here,
so a file that loads for one loads the same way for the other, and every failure is the
same one-line ``SlmError``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import warnings
from pathlib import Path

import torch

from slm_export.errors import SlmError, first_line

TORCHSCRIPT_METADATA = "config.json"  # the _extra_files entry holding the file's metadata


@contextlib.contextmanager
def quiet_jit():
    """Silence only torch.jit's own deprecation notice (torch >= 2.9), where we mean to use it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated",
                                category=DeprecationWarning)
        yield


def load_torchscript(path: str | os.PathLike, map_location="cpu"):
    """Load a TorchScript export -> (module in eval mode, its embedded metadata)."""
    extra = {TORCHSCRIPT_METADATA: ""}
    try:
        with quiet_jit():
            module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as e:
        raise SlmError(f"cannot load TorchScript file {path} ({first_line(e, 120)})") from None
    try:
        metadata = json.loads(extra[TORCHSCRIPT_METADATA])
    except json.JSONDecodeError:
        raise SlmError(f"{path} has no slm-export metadata ({TORCHSCRIPT_METADATA})") from None
    return module.eval(), metadata


def load_aoti(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Load an AOTInductor package (``.pt2``) -> (callable model, its metadata).

    Nothing is compiled: the package holds the compiled model (a shared library) and its
    weights. A package runs only on the device type it was compiled for, and only with the
    libtorch it was compiled against (the torch version in its metadata).
    """
    device = torch.device(device)
    try:
        from torch._inductor import aoti_load_package

        index = device.index if device.index is not None else -1
        model = aoti_load_package(str(path), device_index=index)
        metadata = dict(model.get_metadata())
    except Exception as e:  # a bad zip, a missing library, a libtorch mismatch: many types
        raise SlmError(f"cannot load AOTInductor package {path} ({first_line(e, 120)})") from None
    if "model_config" not in metadata:
        raise SlmError(f"{path} has no slm-export metadata (model_config)")
    compiled_for = metadata.get("AOTI_DEVICE_KEY", "cpu")
    if compiled_for != device.type:
        raise WrongDeviceError(f"{path} was compiled for {compiled_for} and cannot run on "
                               f"{device.type}; export it with export.py --device {device.type}")
    return model, metadata


def ort_session(path: str | os.PathLike | bytes, providers: list | None = None,
                threads: int | None = None):
    """An ONNX Runtime session on ``path`` (or a serialized model): full graph
    optimization, ``threads`` intra-op threads (default torch's count), errors-only logging,
    per-node provider assignment recorded (``placement``); the CPU provider unless
    ``providers`` names others (the runtime's ort backend chooses CUDA)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no per-node placement chatter
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind types (Fail, InvalidProtobuf)
        what = "a modified ONNX graph" if isinstance(path, bytes) else f"ONNX file {path}"
        raise SlmError(f"cannot load {what} ({first_line(e)})") from None


# Ops that carry the model's arithmetic: on the CPU under a GPU provider they mean host copies
# and CPU math every step. (ORT places shape ops - Shape, Gather of shapes, Concat, ... - on
# the CPU on purpose; those are not a fallback.)
HEAVY_OPS = {"MatMul", "MatMulInteger", "MatMulNBits", "Gemm", "DynamicQuantizeLinear",
             "Softmax", "LayerNormalization", "Erf", "Attention", "MultiHeadAttention"}


def placement(session) -> dict[str, dict[str, int]]:
    """{provider: {op type: node count}} as ONNX Runtime assigned the session's nodes."""
    counts: dict[str, dict[str, int]] = {}
    for subgraph in session.get_provider_graph_assignment_info():
        ops = counts.setdefault(subgraph.ep_name, {})
        for node in subgraph.get_nodes():
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return counts


def cpu_fallback(session, preferred: str = "CUDAExecutionProvider") -> dict[str, int]:
    """Arithmetic ops ONNX Runtime left on the CPU although ``preferred`` runs the session
    ({} when nothing fell back, or when the CPU provider is the one preferred)."""
    if preferred == "CPUExecutionProvider":
        return {}
    on_cpu = placement(session).get("CPUExecutionProvider", {})
    return {op: n for op, n in sorted(on_cpu.items()) if op in HEAVY_OPS}


class WrongDeviceError(SlmError):
    """A file compiled for another device type than the one asked for (AOTInductor packages)."""


class CudaProviderError(SlmError):
    """ONNX Runtime's CUDA provider cannot run here; the message says why and what to do."""


def ort_cuda_build() -> str | None:
    """The CUDA version this onnxruntime was built for ("13.0"), or None (a CPU build)."""
    try:
        from onnxruntime.capi import build_and_package_info
    except ImportError:
        return None
    return getattr(build_and_package_info, "cuda_version", None) or None


def ort_cuda_problem() -> str | None:
    """Why ONNX Runtime's CUDA provider would not start here, or None if nothing stops it.

    Checked in order: a CPU-only onnxruntime; CUDA majors of onnxruntime-gpu and torch that
    differ (one process loads one CUDA runtime); the provider library failing to load (the
    loader names the missing NVIDIA library). CI runs all of it on a machine without a GPU.
    """
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDA provider (a CPU build): "
                "install onnxruntime-gpu (README, GPU)")
    built, torch_cuda = ort_cuda_build(), torch.version.cuda
    if built and torch_cuda and built.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"onnxruntime-gpu {ort.__version__} is built for CUDA {built} but torch "
                f"{torch.__version__} for CUDA {torch_cuda}: install builds of one CUDA major "
                "(README, GPU)")
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if library.is_file():
        try:
            ctypes.CDLL(str(library))
        except OSError as e:
            return (f"ONNX Runtime's CUDA provider does not load ({first_line(e, 100)}): "
                    "pip install 'onnxruntime-gpu[cuda,cudnn]' (README, GPU)")
    return None
