"""Benchmark suite setup: options, the model under test, one backend at a time, the summary.

Run explicitly (``testpaths`` is ``tests``, so a plain ``pytest`` never collects this folder):

    pytest bench --benchmark-only                                  # 30m architecture, all backends
    pytest bench --benchmark-only --bench-preset tiny --bench-quick  # ~1-2 min smoke run

The model: ``--bench-model PATH`` (a checkpoint, run folder or export folder), else the
``--bench-preset`` architecture with seeded random weights (decode speed does not depend on
the weights), saved and exported once under ``artifacts/bench/model-<preset>/``.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from slm_export import benchmark as bm

ARTIFACTS = Path("artifacts/bench")
# (backend, variant) in table order; the ort variants run where the export has them, aoti
# where a C++ compiler could build model_kv.pt2.
CASES = [("naive", "fp32"), ("eager", "fp32"), ("compiled", "fp32"), ("torchscript", "fp32"),
         ("aoti", "fp32"), ("ort", "fp32"), ("ort", "int8"), ("ort", "fp16")]


def pytest_addoption(parser):
    g = parser.getgroup("slm-export bench")
    g.addoption("--bench-model", default=None,
                help="checkpoint, run folder or export folder to benchmark (default: random weights)")
    g.addoption("--bench-preset", default="30m", help="architecture for random weights (30m, tiny)")
    g.addoption("--bench-backends", default=None,
                help="comma-separated subset, e.g. eager,ort,ort-int8 (default: all)")
    g.addoption("--bench-threads", type=int, default=None,
                help="torch / ORT intra-op threads (default: torch.get_num_threads())")
    g.addoption("--bench-device", default="auto", help="auto, cpu or cuda")
    g.addoption("--bench-full", action="store_true",
                help="also time the naive backend at batch 8 (~3 minutes on 2 CPU cores)")
    g.addoption("--bench-quick", action="store_true",
                help="fewer scenarios and rounds: a smoke run that prints the table")
    g.addoption("--bench-experiments", action="store_true",
                help="also measure candidate backend speed-ups (bench/test_experiments.py)")
    g.addoption("--bench-refresh", action="store_true", help="re-create the cached random model")
    g.addoption("--bench-results", default=str(ARTIFACTS / "results.json"),
                help="where to write the results JSON")


def case_id(backend: str, variant: str) -> str:
    return backend if variant == "fp32" else f"{backend}-{variant}"


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    wanted = metafunc.config.getoption("--bench-backends")
    cases = CASES
    if wanted:
        names = [w.strip() for w in wanted.split(",") if w.strip()]
        known = {case_id(*c): c for c in CASES}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise pytest.UsageError(f"--bench-backends: unknown {unknown}; choose from {list(known)}")
        cases = [known[n] for n in names]
    # Session scope: pytest runs every test of one backend, then tears it down before the next.
    metafunc.parametrize("case", cases, ids=[case_id(*c) for c in cases], indirect=True,
                         scope="session")


@dataclass
class Bench:
    """Everything a benchmark test needs beside its backend; one per session."""

    model_dir: Path  # a run folder (best.pt + export/) or what --bench-model named
    preset: str
    config: object
    device: torch.device
    threads: int
    quick: bool
    full: bool
    bandwidth: float  # bytes/s, measured here with `threads` threads
    mem: bm.RssPeak = field(default_factory=bm.RssPeak)
    results: list[bm.Result] = field(default_factory=list)

    @property
    def target_s(self) -> float:  # timed seconds per scenario (rounds = target / one call)
        return 2.0 if self.quick else 6.0

    @property
    def max_rounds(self) -> int:
        return 3 if self.quick else 5


_BENCH: Bench | None = None


def _formats() -> tuple[str, ...]:
    from slm_export.export.aoti import compiler_problem

    return ("onnx", "torchscript") + (() if compiler_problem() else ("aoti",))


def _export(run_dir: Path, ckpt_path: Path) -> None:
    """Export ``ckpt_path`` into ``run_dir/export`` (TorchScript, ONNX, int8 and fp16 ONNX, and
    the AOTInductor package where it compiles), verified, through the library call export.py
    makes."""
    from slm_export.export import build

    out = run_dir / "export"
    shutil.rmtree(out, ignore_errors=True)  # our own cache: a stale or partial export goes
    build(ckpt_path, out, formats=_formats(), variants=("int8", "fp16"))


def _random_model(preset: str, refresh: bool) -> Path:
    """artifacts/bench/model-<preset>/{best.pt, export/}: seeded random weights, exported once."""
    from slm_export import checkpoint
    from slm_export.artifacts.manifest import Manifest
    from slm_export.config import preset as get_preset
    from slm_export.model import GPT

    run_dir = ARTIFACTS / f"model-{preset}"
    ckpt_path = run_dir / "best.pt"
    if not refresh and ckpt_path.is_file():
        try:
            manifest = Manifest.read(run_dir / "export", verify_hashes=False)
            if "aoti" not in _formats() or manifest.has("aoti_kv"):  # else an older cache
                return run_dir
        except Exception:
            pass  # a partial or stale export: write it again
    config = get_preset(preset)
    torch.manual_seed(0)
    model = GPT(config).eval()
    checkpoint.save(checkpoint.weights_payload(model, config), ckpt_path)
    start = time.perf_counter()
    _export(run_dir, ckpt_path)
    print(f"\nbench: exported random-weight {preset} model to {run_dir} "
          f"in {time.perf_counter() - start:.0f} s")
    return run_dir


def _model_config(model_dir: Path):
    from slm_export.artifacts.manifest import Manifest
    from slm_export.checkpoint import load
    from slm_export.config import GPTConfig
    from slm_export.runtime import resolve_model_path

    for backend in ("eager", "ort"):
        try:
            target = resolve_model_path(backend, model_dir)
        except Exception:
            continue
        if backend == "eager":
            return GPTConfig.from_dict(load(target)["model_config"])
        return Manifest.read(target, verify_hashes=False).config
    raise pytest.UsageError(f"--bench-model {model_dir}: neither a checkpoint nor an export folder")


@pytest.fixture(scope="session")
def bench(request) -> Bench:
    global _BENCH
    from slm_export.devices import resolve_device

    opt = request.config.getoption
    threads = opt("--bench-threads") or torch.get_num_threads()
    torch.set_num_threads(threads)
    device = resolve_device(opt("--bench-device"))
    if opt("--bench-model"):
        model_dir, preset = Path(opt("--bench-model")), Path(opt("--bench-model")).name
    else:
        model_dir, preset = _random_model(opt("--bench-preset"), opt("--bench-refresh")), \
            opt("--bench-preset")
    bandwidth = bm.measure_read_bandwidth(device, threads)
    _BENCH = Bench(model_dir=model_dir, preset=preset, config=_model_config(model_dir),
                   device=device, threads=threads, quick=opt("--bench-quick"), full=opt("--bench-full"),
                   bandwidth=bandwidth)
    return _BENCH


@dataclass
class Case:
    backend_name: str
    variant: str
    backend: object
    load_s: float
    baseline_mb: float | None  # before the backend was built: process RSS, or on CUDA the
    # device memory in use (torch.cuda.mem_get_info), which also sees ONNX Runtime's arena


@pytest.fixture(scope="session")
def case(request, bench) -> Case:
    """The backend under test, built once and released before the next backend is built."""
    from slm_export.errors import SlmError
    from slm_export.runtime import load_backend

    name, variant = request.param
    bench.mem.reset()
    baseline = bench.mem.rss_mb()
    if bench.device.type == "cuda":  # CUDA-only: run by scripts/gpu-check.sh
        torch.cuda.empty_cache()
        baseline = bm.cuda_used_mb(bench.device)
    start = time.perf_counter()
    try:
        backend = load_backend(name, bench.model_dir, bench.device, variant=variant)
    except (SlmError, ImportError, RuntimeError) as e:
        pytest.skip(f"{case_id(name, variant)} cannot run here: {e}")
    load_s = time.perf_counter() - start
    if backend.device.type != bench.device.type:
        pytest.skip(f"{case_id(name, variant)} runs on {backend.device.type}, "
                    f"not the requested {bench.device.type}")
    yield Case(name, variant, backend, load_s, baseline)
    del backend
    bench.mem.trim()


def write_results(b: Bench, path: str) -> Path:
    """results.json with every row so far (called after each row, so a killed run keeps them)."""
    return bm.write_results(path, bm.machine_info(b.threads), b.results, extra={
        "bandwidth_gb_s": round(b.bandwidth / 1e9, 2),
        "roofline_tokens_per_s_fp32_batch1": round(bm.roofline_tokens_per_s(b.bandwidth, b.config), 1),
        "model": str(b.model_dir),
    })


def pytest_runtest_teardown(item):
    if _BENCH is not None and _BENCH.results:
        write_results(_BENCH, item.config.getoption("--bench-results"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _BENCH is None or not _BENCH.results:
        return
    from rich.console import Console

    b = _BENCH
    machine = bm.machine_info(b.threads)
    ceiling = bm.roofline_tokens_per_s(b.bandwidth, b.config)
    path = write_results(b, config.getoption("--bench-results"))
    console = Console(file=terminalreporter._tw._file, force_terminal=False, width=200)
    load = f", load avg {machine['load_avg'][0]:.2f}" if machine["load_avg"] else ""
    console.print(bm.results_table(b.results, title=(
        f"slm-export bench: {b.preset} on {machine['gpu'] or machine['cpu']}, {b.threads} threads, "
        f"read bandwidth {b.bandwidth / 1e9:.1f} GB/s -> fp32 roofline {ceiling:.0f} tok/s "
        f"at batch 1{load}")))
    console.print(f"results written to {os.fspath(path)}")
