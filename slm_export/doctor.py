"""``slm-doctor`` (``python -m slm_export.doctor``): what this machine can run, checked by running it.

Prints three tables: versions and devices (torch and its CUDA, the GPU and its compute
capability, bf16 without emulation, onnxruntime's CUDA build, its available providers and
the one a tiny session actually gets, the NVIDIA libraries found, and why ONNX Runtime's CUDA
provider cannot start, if it cannot); then, for every backend on every device present, a
smoke run: greedy tokens from a tiny random model exported on the spot, compared with eager
on the CPU, PASS or FAIL with the reason. On a machine without CUDA it runs the CPU half and
says that CUDA is absent. Exit code 0 when every smoke run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from slm_export import registry
from slm_export.config import GPTConfig
from slm_export.errors import first_line

SMOKE_CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0)
SMOKE_PROMPTS = [[464, 1310, 3290], [7454]]  # a padded batch of 2
SMOKE_TOKENS = 40  # crosses the 32-token window: a rebase runs too


@dataclass
class Smoke:
    backend: str
    device: str
    status: str  # PASS, FAIL or SKIP
    detail: str
    seconds: float


def facts() -> list[tuple[str, str]]:
    """(what, value) rows about this machine's torch, GPU and ONNX Runtime."""
    import onnxruntime as ort

    from slm_export.artifacts.loaders import ort_cuda_build, ort_cuda_problem

    rows = [("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU build'})")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            bf16 = "yes" if bf16_native(i) else "no (training uses fp16 + GradScaler)"
            rows.append((f"GPU {i}", f"{torch.cuda.get_device_name(i)}, compute capability "
                                     f"{major}.{minor}, bf16 {bf16}"))
    else:
        rows.append(("GPU", "none: CUDA is absent on this machine (torch sees no CUDA device)"))
    rows.append(("onnxruntime", f"{ort.__version__} (built for CUDA {ort_cuda_build() or 'none'})"))
    rows.append(("ORT providers available", ", ".join(ort.get_available_providers())))
    rows.append(("ORT CUDA provider", ort_cuda_problem() or "can start"))
    rows.append(("NVIDIA pip packages", ", ".join(_nvidia_packages()) or "none"))
    from slm_export.export.aoti import compiler_problem

    rows.append(("C++ compiler (compiled on the CPU, aoti)", compiler_problem() or "works"))
    return rows


def bf16_native(index: int) -> bool:
    """bf16 in hardware (compute capability >= 8.0, Ampere on); older GPUs emulate it slowly."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def _nvidia_packages() -> list[str]:
    return sorted(f"{d.metadata['Name']} {d.version}" for d in importlib.metadata.distributions()
                  if (d.metadata["Name"] or "").lower().startswith("nvidia-"))


def _export_smoke_model(folder: Path, backends: Sequence[str]):
    """The smoke model, exported to the formats ``backends`` read (ONNX, TorchScript, an
    AOTInductor package for the CPU where a C++ compiler is found): nothing else is built."""
    from slm_export.export import build
    from slm_export.export.aoti import compiler_problem
    from slm_export.model import GPT

    torch.manual_seed(0)
    model = GPT(SMOKE_CONFIG).eval()
    formats = registry.formats_for(backends)
    if compiler_problem():
        formats = [f for f in formats if f != "aoti"]
    if formats:
        build(model, folder / "export", formats=formats, verify=False)
    return model


def _aoti_package(folder: Path, model, device: str) -> Path:
    """The export holding a package for ``device``: the CPU one, or one compiled here for
    CUDA (a package runs on the device type it was compiled for)."""
    if torch.device(device).type == "cpu":
        return folder / "export"
    from slm_export.export import build

    build(model, folder / "export-cuda", formats=("aoti",), device=device, verify=False)
    return folder / "export-cuda"


def smoke_runs(devices: list[str], backends: Sequence[str] | None = None) -> list[Smoke]:
    """Greedy SMOKE_TOKENS from each backend (default: all) on every device, each beside eager
    on the CPU (``runtime.parity``: eager's own tokens, or a tie where float noise may pick
    either, as TF32 or another GPU kernel can)."""
    from slm_export.export.aoti import compiler_problem
    from slm_export.runtime import backend_for_model, load_backend, parity

    backends = backends or registry.NAMES
    with tempfile.TemporaryDirectory(prefix="slm-doctor-") as tmp:
        model = _export_smoke_model(Path(tmp), backends)
        eager = backend_for_model("eager", model)
        results = []
        for device in devices:
            for name in backends:
                start = time.perf_counter()
                if name == "aoti" and (problem := compiler_problem()):
                    results.append(Smoke(name, device, "SKIP", problem, 0.0))
                    continue
                try:
                    if registry.backend(name).from_checkpoint:
                        backend = backend_for_model(name, _copy_to(model, device))
                    elif name == "aoti":
                        backend = load_backend(name, _aoti_package(Path(tmp), model, device), device)
                    else:
                        backend = load_backend(name, Path(tmp) / "export", device)
                    report = parity.greedy(eager, backend, SMOKE_PROMPTS, SMOKE_TOKENS).check()
                    ties = f" ({report.tie_count} tie(s))" if report.tie_count else ""
                    status, detail = "PASS", f"greedy tokens are eager's{ties}"
                except Exception as e:  # a smoke run reports every failure, whatever its type
                    status, detail = "FAIL", f"{type(e).__name__}: {first_line(e, 140)}"
                results.append(Smoke(name, device, status, detail, time.perf_counter() - start))
    return results


def _copy_to(model, device: str):
    import copy

    return copy.deepcopy(model).to(device)


def print_report(rows, smokes: list[Smoke], console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="slm-export doctor: this machine")
    table.add_column("what")
    table.add_column("found")
    for what, value in rows:
        table.add_row(what, escape(value))  # "[cuda,cudnn]" is text, not rich markup
    console.print(table)
    table = Table(title=f"smoke runs: greedy {SMOKE_TOKENS} tokens, a padded batch of "
                        f"{len(SMOKE_PROMPTS)}, tiny random model, vs eager on the CPU")
    for column in ("backend", "device", "result", "seconds", "detail"):
        table.add_column(column)
    for s in smokes:
        table.add_row(s.backend, s.device, s.status, f"{s.seconds:.1f}", escape(s.detail))
    console.print(table)


def _backend_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in registry.NAMES for n in names):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(registry.NAMES)}")
    return names


def main(argv=None) -> int:
    from rich.console import Console

    p = argparse.ArgumentParser(prog="slm-doctor", description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="also write the findings as JSON to this file")
    p.add_argument("--backends", type=_backend_list, default=None,
                   help="comma-separated backends to smoke-run (default: all)")
    args = p.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows, smokes = facts(), smoke_runs(devices, args.backends)
    print_report(rows, smokes, Console(width=160))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"facts": dict(rows),
                                         "smoke": [vars(s) for s in smokes]}, indent=2) + "\n")
    return 0 if all(s.status != "FAIL" for s in smokes) else 1


if __name__ == "__main__":
    sys.exit(main())
