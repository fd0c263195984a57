"""``slm-doctor`` (``python -m slm_export.doctor``): what this machine can run, checked by running it.

Prints three tables: versions and devices (torch and its CUDA, the GPU and its compute
capability, bf16 without emulation, onnxruntime's CUDA build, its available providers and
the ones a tiny session actually gets, the NVIDIA libraries found, why ONNX Runtime's CUDA
provider cannot start, if it cannot, the C++ compiler and the CUDA toolkit AOTInductor
needs); then, for every backend on every device present, a smoke run: greedy tokens from a
tiny random model exported on the spot, compared with eager on the CPU, PASS, FAIL or SKIP
with the reason (on CUDA also the fp16 / int4 ONNX files with the ops ORT left on the CPU,
a CUDA graph that would be skipped as a failure, speculation, and two training steps per
precision). On a machine without CUDA it runs the CPU half and says that CUDA is absent.
Exit code 0 when every smoke run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._inductor.config

from slm_export import registry
from slm_export.config import GPTConfig
from slm_export.errors import first_line

SMOKE_CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0)
SMOKE_PROMPTS = [[464, 1310, 3290], [7454]]  # a padded batch of 2
SMOKE_TOKENS = 40  # crosses the 32-token window: a rebase runs too
SMOKE_AGREEMENT = 0.8  # a reduced variant's greedy tokens eager would pick (random weights)


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
    rows.append(("ORT session gets", _probe_session()))
    rows.append(("NVIDIA pip packages", ", ".join(_nvidia_packages()) or "none"))
    from slm_export.export.aoti import compiler_problem, cuda_toolkit_problem

    rows.append(("C++ compiler (compiled on the CPU, aoti)", compiler_problem() or "works"))
    if torch.version.cuda:
        from torch.utils import cpp_extension

        rows.append(("CUDA toolkit (aoti on CUDA)", cuda_toolkit_problem() or f"{cpp_extension.CUDA_HOME}"))
    return rows


def _probe_session() -> str:
    """The providers a tiny ONNX session actually gets, the CUDA provider asked for first
    where ONNX Runtime lists it (a provider that does not start drops out of the list)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    available = ort.get_available_providers()
    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=wanted)
    except Exception as e:  # onnxruntime's own types; the fact is the failure
        return f"no session ({type(e).__name__}: {first_line(e, 100)})"
    return ", ".join(session.get_providers())


def bf16_native(index: int) -> bool:
    """bf16 in hardware (compute capability >= 8.0, Ampere on); older GPUs emulate it slowly."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def _nvidia_packages() -> list[str]:
    return sorted(f"{d.metadata['Name']} {d.version}" for d in importlib.metadata.distributions()
                  if (d.metadata["Name"] or "").lower().startswith("nvidia-"))


def _export_smoke_model(folder: Path, backends: Sequence[str], cuda: bool = False):
    """The smoke model, exported to the formats ``backends`` read (ONNX, TorchScript, an
    AOTInductor package for the CPU where a C++ compiler is found), with the ONNX variants
    the CUDA provider serves where ``cuda``: nothing else is built."""
    from slm_export.export import build
    from slm_export.export.aoti import compiler_problem
    from slm_export.model import GPT

    torch.manual_seed(0)
    model = GPT(SMOKE_CONFIG).eval()
    from slm_export.runtime import executorch

    formats = registry.formats_for(backends)
    if compiler_problem():
        formats = [f for f in formats if f != "aoti"]
    if executorch.problem():
        formats = [f for f in formats if f != "executorch"]
    variants = [v for v in registry.REDUCED if registry.backend("ort").serves(v, "cuda")]
    if formats:
        build(model, folder / "export", formats=formats, verify=False,
              variants=variants if cuda and "onnx" in formats else ())
    return model


def _aoti_package(folder: Path, model, device: str) -> Path:
    """The export holding a package for ``device``: the CPU one, or one compiled here for
    CUDA (a package runs on the device type it was compiled for)."""
    if torch.device(device).type == "cpu":
        return folder / "export"
    from slm_export.export import build

    if not (folder / "export-cuda").is_dir():
        build(model, folder / "export-cuda", formats=("aoti",), device=device, verify=False)
    return folder / "export-cuda"


def _cases(devices: list[str], backends: Sequence[str]) -> list[tuple[str, str, str]]:
    """(backend, variant, device) smoke cases: fp32 everywhere; on CUDA also the ONNX variants
    the CUDA provider serves (fp16, int4: their kernels are other kernels)."""
    cases = []
    for device in devices:
        for name in backends:
            variants = ["fp32"]
            if device == "cuda" and name == "ort":
                variants += [v for v in registry.REDUCED if registry.backend("ort").serves(v, "cuda")]
            cases += [(name, v, device) for v in variants]
    return cases


def _skip_reason(name: str, device: str) -> str | None:
    from slm_export.export.aoti import compiler_problem, cuda_toolkit_problem
    from slm_export.runtime import executorch

    if name == "executorch":
        return executorch.problem()
    if name != "aoti":
        return None
    return compiler_problem() or (cuda_toolkit_problem() if device == "cuda" else None)


def _smoke_backend(tmp: Path, model, name: str, variant: str, device: str):
    import copy

    from slm_export.runtime import backend_for_model, load_backend

    if registry.backend(name).from_checkpoint:
        return backend_for_model(name, copy.deepcopy(model).to(device))
    if name == "aoti":
        return load_backend(name, _aoti_package(tmp, model, device), device)
    return load_backend(name, tmp / "export", device, variant)


def _smoke(eager, backend, variant: str, device: str) -> str:
    """One smoke run -> its PASS detail; raises on a failure. fp32: eager's greedy tokens (ties
    aside); a reduced variant: eager picks its tokens nearly everywhere. On CUDA a CUDA graph
    that compiled would skip is an error (inductor's cudagraph_or_error), and the ops ONNX
    Runtime left on the CPU are named."""
    from slm_export.runtime import parity

    with contextlib.ExitStack() as stack:
        if device == "cuda":  # CUDA-only: a silently skipped CUDA graph fails the smoke run
            stack.enter_context(torch._inductor.config.patch({"triton.cudagraph_or_error": True}))
        report = parity.greedy(eager, backend, SMOKE_PROMPTS, SMOKE_TOKENS)
    if variant == "fp32":
        report.check()
        detail = "greedy tokens are eager's" + (f" ({report.tie_count} tie(s))" if report.tie_count else "")
    elif report.agreement < SMOKE_AGREEMENT:
        raise AssertionError(f"eager agrees with {report.agreement:.0%} of its greedy tokens")
    else:
        detail = f"eager agrees with {report.agreement:.0%} of its greedy tokens"
    session = getattr(backend, "session", None)
    if device == "cuda" and session is not None:
        from slm_export.artifacts.loaders import placement

        on_cpu = placement(session).get("CPUExecutionProvider", {})
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(on_cpu.items()))
        detail += f"; on the CPU: {ops or 'nothing'}"
    return detail


def smoke_runs(devices: list[str], backends: Sequence[str] | None = None) -> list[Smoke]:
    """Greedy SMOKE_TOKENS from each backend (default: all) on every device, each beside eager
    on the CPU (``runtime.parity``: eager's own tokens, or a tie where float noise may pick
    either, as another GPU kernel can); on CUDA also speculation and two training steps."""
    from slm_export.runtime import backend_for_model

    backends = backends or registry.NAMES
    with tempfile.TemporaryDirectory(prefix="slm-doctor-") as tmp:
        model = _export_smoke_model(Path(tmp), backends, cuda="cuda" in devices)
        eager = backend_for_model("eager", model)
        results = []
        for name, variant, device in _cases(devices, backends):
            start, label = time.perf_counter(), name if variant == "fp32" else f"{name} {variant}"
            if problem := _skip_reason(name, device):
                results.append(Smoke(label, device, "SKIP", problem, 0.0))
                continue
            try:
                backend = _smoke_backend(Path(tmp), model, name, variant, device)
                status, detail = "PASS", _smoke(eager, backend, variant, device)
            except Exception as e:  # a smoke run reports every failure, whatever its type
                status, detail = "FAIL", f"{type(e).__name__}: {first_line(e, 140)}"
            results.append(Smoke(label, device, status, detail, time.perf_counter() - start))
        if "cuda" in devices:  # CUDA-only (scripts/gpu-check.sh runs it on a GPU)
            results += extras(Path(tmp), model, backends, "cuda")
    return results


def extras(tmp: Path, model, backends: Sequence[str], device: str) -> list[Smoke]:
    """Run on CUDA by ``smoke_runs``: greedy speculation on each backend that runs there (its
    verify steps are other graphs), and two training steps in each precision the device
    trains in (bf16 where native, fp16 with a GradScaler; fp32 on the CPU)."""
    from slm_export.runtime import GREEDY, generate
    from slm_export.runtime.speculative import NgramDrafter

    out = []
    for name in [b for b in backends if b in ("compiled", "ort", "eager")]:
        start = time.perf_counter()
        try:
            backend = _smoke_backend(tmp, model, name, "fp32", device)
            kw = dict(max_new_tokens=SMOKE_TOKENS, sampling=GREEDY, stop_id=None)
            plain = generate(backend, SMOKE_PROMPTS, **kw)
            spec = generate(backend, SMOKE_PROMPTS, drafter=NgramDrafter(min_ngram=1), **kw)
            ok = spec.tokens == plain.tokens and spec.stats.verify_steps > 0
            status, detail = ("PASS", "speculative greedy is plain greedy") if ok else \
                ("FAIL", "speculative greedy differs from plain greedy")
        except Exception as e:  # reported as the row's failure
            status, detail = "FAIL", f"{type(e).__name__}: {first_line(e, 140)}"
        out.append(Smoke(f"{name} + ngram", device, status, detail, time.perf_counter() - start))
    dtypes = ["fp32"] if device == "cpu" else (["bf16"] if bf16_native(0) else []) + ["fp16"]
    return out + [_train_smoke(tmp, dtype, device) for dtype in dtypes]


def _train_smoke(tmp: Path, dtype: str, device: str) -> Smoke:
    """Two training steps of the smoke architecture in ``dtype``: the loss finite."""
    import math

    from slm_export.config import TrainConfig
    from slm_export.training import train

    start = time.perf_counter()
    try:
        cfg = TrainConfig(dataset="stories", stories=40, max_iters=2, eval_interval=2, eval_iters=1,
                          batch_size=2, dtype=dtype, device=device, plots=False,
                          out_dir=str(tmp / f"train-{dtype}"), data_root=str(tmp / "data"))
        result = train(cfg, SMOKE_CONFIG)
        loss = result.metrics[-1]["train_loss"]
        status, detail = ("PASS", f"loss {loss:.3f}") if math.isfinite(loss) else ("FAIL", f"loss {loss}")
    except Exception as e:  # reported as the row's failure
        status, detail = "FAIL", f"{type(e).__name__}: {first_line(e, 140)}"
    return Smoke(f"train {dtype}", device, status, detail, time.perf_counter() - start)


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
