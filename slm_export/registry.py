"""What varies, in one table: the runtime backends and the variants (precisions) of exported files.

Everything that lists backends or variants reads them here: the runtime's ``load_backend``,
the exporter and its verification, the doctor, the bench, the server and the command lines.

- A **variant** is a file's precision: ``fp32`` (every format) or one of ``REDUCED`` (ONNX
  files derived from the fp32 graph, each held to a quality gate before it is published;
  ``mixed``: 4-bit blocks with an 8-bit embedding / lm_head).
  export.py's ``--quantize int8|int4`` and ``--dtype fp16`` ask for them; the manifest
  records a file's variant under its historical key ``dtype``.
- A **format** is what ``export.py --format`` writes (onnx, torchscript, aoti, hf): one or
  more files, each of a manifest **kind** (``onnx_kv``: the ONNX cache graph).
- A **backend** runs one kind of file (or a checkpoint) behind the runtime contract.
"""

from __future__ import annotations

from dataclasses import dataclass

from slm_export.errors import SlmError

VARIANTS = ("fp32", "fp16", "int8", "int4", "mixed")
REDUCED = ("int8", "int4", "mixed", "fp16")  # in the order export.py writes and verifies them

CHECKPOINT = "checkpoint"  # what the torch backends load (a best.pt, or the run folder holding it)


@dataclass(frozen=True)
class BackendSpec:
    """One runtime backend: what it loads, what it serves, and where its class lives.

    ``loads``: ``CHECKPOINT`` or the manifest kind of the export file it opens; ``format``:
    the export.py format that writes that file (None for a checkpoint); ``variants``: the
    variants it serves; ``cuda_variants``: those it serves on CUDA (``None``: all of them);
    ``impl``: ``module:Class``, imported when the backend is built.
    """

    name: str
    loads: str
    format: str | None
    variants: tuple[str, ...]
    impl: str
    summary: str
    cuda_variants: tuple[str, ...] | None = None

    @property
    def from_checkpoint(self) -> bool:
        return self.loads == CHECKPOINT

    def serves(self, variant: str, device_type: str = "cpu") -> bool:
        allowed = self.variants if device_type != "cuda" or self.cuda_variants is None else self.cuda_variants
        return variant in allowed


_SPECS = (
    BackendSpec("eager", CHECKPOINT, None, ("fp32",), "slm_export.runtime.eager:EagerBackend",
                "PyTorch with a functional KV cache"),
    BackendSpec("compiled", CHECKPOINT, None, ("fp32",), "slm_export.runtime.compiled:CompiledBackend",
                "torch.compile over a static cache (CUDA graphs on CUDA)"),
    BackendSpec("torchscript", "torchscript_kv", "torchscript", ("fp32",),
                "slm_export.runtime.torchscript:TorchScriptBackend", "the exported model_kv.ts"),
    BackendSpec("ort", "onnx_kv", "onnx", VARIANTS, "slm_export.runtime.ort:OrtBackend",
                "ONNX Runtime on onnx/model*.onnx (CUDA provider where usable)",
                # dynamic int8 quantization has no CUDA kernels: refused there by design
                cuda_variants=("fp32", "fp16", "int4", "mixed")),
    BackendSpec("aoti", "aoti_kv", "aoti", ("fp32",), "slm_export.runtime.aoti:AotiBackend",
                "the AOTInductor package model_kv.pt2"),
    BackendSpec("executorch", "executorch_kv", "executorch", ("fp32", "int8"),
                "slm_export.runtime.executorch:ExecutorchBackend",
                "ExecuTorch's model_kv.pte (XNNPACK), the phone / edge file", cuda_variants=()),
    BackendSpec("naive", CHECKPOINT, None, ("fp32",), "slm_export.runtime.naive:NaiveBackend",
                "no cache: the whole window per token (the yardstick)"),
)
BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in _SPECS}
NAMES = tuple(BACKENDS)


def backend(name: str) -> BackendSpec:
    """The spec of backend ``name``; an unknown name is a one-line ``SlmError``."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise SlmError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}") from None


def check_variant(name: str, variant: str, device_type: str = "cpu") -> BackendSpec:
    """The spec of backend ``name`` if it serves ``variant`` on ``device_type``; else one line."""
    spec = backend(name)
    if variant not in VARIANTS:
        raise SlmError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if not spec.serves(variant):
        serving = [s.name for s in _SPECS if s.serves(variant)]
        raise SlmError(f"--variant {variant} applies to the {' and '.join(serving)} "
                       f"backend{'s' if len(serving) > 1 else ''} only")
    if not spec.serves(variant, device_type):
        raise SlmError(f"backend {name} does not serve --variant {variant} on {device_type}")
    return spec


def cases(device_type: str = "cpu") -> list[tuple[str, str]]:
    """Every (backend, variant) pair served on ``device_type``, in table order."""
    return [(s.name, v) for s in _SPECS for v in s.variants if s.serves(v, device_type)]


def formats_for(names) -> list[str]:
    """The export formats the given backends load, in table order, once each."""
    wanted = {backend(n).format for n in names}
    return [s.format for s in _SPECS if s.format in wanted and s.format is not None]
