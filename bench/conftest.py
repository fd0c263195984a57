"""Benchmark suite setup: options, the model under test, one backend at a time, the summary.

Run explicitly (``testpaths`` is ``tests``, so a plain ``pytest`` never collects this folder):

    pytest bench --benchmark-only                                  # 30m architecture, all backends
    pytest bench --benchmark-only --bench-preset tiny --bench-quick  # the CI smoke run

The model: ``--bench-model DIR`` (a run folder holding best.pt and export/), else the
``--bench-preset`` architecture trained briefly on the embedded stories through train.py
(``--bench-train-steps``) and exported with every variant, once, under
``artifacts/bench/model-<preset>-<steps>steps/``. Decode speed does not depend on the weights, but the
parity checks (int8 / fp16 top-1 agreement) and speculative decoding (acceptance) only mean
something on a model that has learned text. For the 30m preset the tiny one is trained too:
it is the draft model of the speculative rows.

A backend that fails to load fails its rows (only ``--bench-backends`` excludes one), and
every row's first round is checked against eager before anything is timed: fp32 backends
must give eager's greedy tokens, the reduced-precision variants its top-1 choices.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from slm_export import benchmark as bm
from slm_export.config import TrainConfig
from slm_export.data import Source

ARTIFACTS = Path("artifacts/bench")
REPO = Path(__file__).resolve().parents[1]
# (backend, variant) in table order; aoti where a C++ compiler could build model_kv.pt2.
CASES = [("naive", "fp32"), ("eager", "fp32"), ("compiled", "fp32"), ("torchscript", "fp32"),
         ("aoti", "fp32"), ("ort", "fp32"), ("ort", "int8"), ("ort", "int4"), ("ort", "fp16")]
CUDA_EXCLUDED = {("ort", "int8")}  # dynamic int8 has no CUDA kernels: refused there by design
TRAIN_STEPS = {"30m": 300, "tiny": 150}
VARIANTS = ("int8", "int4", "fp16")


def pytest_addoption(parser):
    g = parser.getgroup("slm-export bench")
    g.addoption("--bench-model", default=None,
                help="a run folder (best.pt + export/) to benchmark (default: the preset, trained briefly)")
    g.addoption("--bench-preset", default="30m", help="architecture of the default model (30m, tiny)")
    g.addoption("--bench-train-steps", type=int, default=None,
                help="training steps of the default model (default 300 for 30m, 150 for tiny)")
    g.addoption("--bench-draft", default=None,
                help="run folder of the draft model for the speculative rows (default: the tiny "
                     "preset trained here, when the model under test is larger)")
    g.addoption("--bench-draft-variant", default="int4",
                help="ONNX variant of the draft model, run through ort (default int4)")
    g.addoption("--bench-draft-vocab", default=None,
                help="a prepared data folder: the draft guesses only its most frequent tokens "
                     "(generate.py --draft-vocab; default: the stories the bench's own models "
                     "trained on, with its own tiny draft; 'none': the full vocabulary)")
    g.addoption("--bench-ngram-data", default=None,
                help="a prepared data folder for the ngram+data speculative rows (generate.py "
                     "--ngram-data; default: the stories the bench's own models trained on; "
                     "'none' leaves those rows out)")
    g.addoption("--bench-backends", default=None,
                help="comma-separated subset, e.g. eager,ort,ort-int8 (default: all)")
    g.addoption("--bench-threads", type=int, default=None,
                help="torch / ORT intra-op threads (default: torch.get_num_threads())")
    g.addoption("--bench-device", default="auto", help="auto, cpu or cuda")
    g.addoption("--bench-full", action="store_true",
                help="also time the naive backend at batch 8 and 32 (minutes on 2 CPU cores)")
    g.addoption("--bench-quick", action="store_true",
                help="fewer scenarios and rounds: a smoke run that prints the table")
    g.addoption("--bench-experiments", action="store_true",
                help="also measure candidate backend speed-ups (bench/test_experiments.py)")
    g.addoption("--bench-engines", action="store_true",
                help="also time other engines on our weights: CTranslate2, llama.cpp "
                     "(bench/test_engines.py)")
    g.addoption("--bench-llama-cpp", default=None,
                help="a llama.cpp source tree: its convert_hf_to_gguf.py writes the GGUF files "
                     "of the llama.cpp rows (--bench-engines)")
    g.addoption("--bench-refresh", action="store_true", help="train and export the cached model again")
    g.addoption("--bench-results", default=str(ARTIFACTS / "results.json"),
                help="where to write the results JSON")


def case_id(backend: str, variant: str) -> str:
    return backend if variant == "fp32" else f"{backend}-{variant}"


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    wanted = metafunc.config.getoption("--bench-backends")
    cases = CASES
    if metafunc.config.getoption("--bench-device") == "cuda":
        cases = [c for c in CASES if c not in CUDA_EXCLUDED]
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

    model_dir: Path  # a run folder: best.pt + export/
    preset: str
    config: object
    device: torch.device
    threads: int
    quick: bool
    full: bool
    bandwidth: float  # bytes/s, measured here with `threads` threads
    draft_dir: Path | None = None  # a smaller trained model of the same tokenizer, if any
    draft_variant: str = "int4"  # its ONNX variant, run through ort
    draft_vocab: Path | None = None  # a data folder: the draft scores its frequent tokens only
    ngram_data: Path | None = None  # a data folder: n-gram counts for the ngram+data rows
    mem: bm.RssPeak = field(default_factory=bm.RssPeak)
    results: list[bm.Result] = field(default_factory=list)
    _eager: object = None
    _reference: dict = field(default_factory=dict)

    @property
    def min_rounds(self) -> int:  # timed rounds per row, where the time cap allows
        return 3 if self.quick else 5

    @property
    def max_seconds(self) -> float:  # timed seconds per row at most (one round always runs)
        return 10.0 if self.quick else 60.0

    @property
    def eager(self):
        """The eager backend on the model under test: the reference of every check."""
        from slm_export.runtime import load_backend

        if self._eager is None:
            self._eager = load_backend("eager", self.model_dir, self.device)
        return self._eager

    def reference(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Eager's greedy tokens for these prompts (computed once)."""
        from slm_export.runtime import GREEDY, generate

        key = (tuple(map(tuple, prompts)), new_tokens)
        if key not in self._reference:
            self._reference[key] = generate(self.eager, prompts, max_new_tokens=new_tokens,
                                            sampling=GREEDY, stop_id=None).tokens
        return self._reference[key]


_BENCH: Bench | None = None


def _formats() -> tuple[str, ...]:
    """onnx + torchscript; aoti where a C++ compiler is found; hf/ where transformers is
    installed (other engines' converters read it: --bench-engines)."""
    from slm_export.export.aoti import compiler_problem

    return ("onnx", "torchscript", *([] if compiler_problem() else ["aoti"]),
            *(["hf"] if importlib.util.find_spec("transformers") else []))


def _trained_model(preset: str, steps: int, refresh: bool) -> Path:
    """artifacts/bench/model-<preset>-<steps>steps/: the preset trained ``steps`` steps on the embedded
    stories through train.py, exported (TorchScript, ONNX, int8, int4, fp16) and verified; reused
    while its export's manifest is valid and it was trained for the same steps."""
    from slm_export.artifacts.manifest import Manifest
    from slm_export.export import build

    run_dir = ARTIFACTS / f"model-{preset}-{steps}steps"
    try:
        manifest = Manifest.read(run_dir / "export", verify_hashes=False)
        complete = all(manifest.has("onnx_kv", v) for v in VARIANTS) and (
            "aoti" not in _formats() or manifest.has("aoti_kv"))
        if not refresh and complete:
            return run_dir
    except Exception:
        pass  # none yet, or a partial or older one: train and export again
    start = time.perf_counter()
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "train.py"), "--dataset", "stories", "--preset", preset,
           "--max-iters", str(steps), "--eval-interval", str(steps), "--eval-iters", "4",
           "--batch-size", "8", "--warmup-iters", str(min(100, steps // 5)), "--lr", "2e-3",
           "--min-lr", "2e-4", "--out-dir", str(run_dir), "--data-root", str(ARTIFACTS / "data"),
           "--no-plots", "--quiet", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"training the bench model failed: {proc.stderr[-1000:]}")
    build(run_dir / "best.pt", run_dir / "export", formats=_formats(), variants=VARIANTS)
    print(f"\nbench: trained {preset} for {steps} steps and exported it to {run_dir} "
          f"in {time.perf_counter() - start:.0f} s")
    return run_dir


def _model_config(model_dir: Path):
    from slm_export.checkpoint import load
    from slm_export.config import GPTConfig

    if not (model_dir / "best.pt").is_file() or not (model_dir / "export").is_dir():
        raise pytest.UsageError(f"--bench-model {model_dir}: needs a run folder with best.pt "
                                "and export/ (python export.py writes it)")
    return GPTConfig.from_dict(load(model_dir / "best.pt")["model_config"])


@pytest.fixture(scope="session")
def bench(request) -> Bench:
    global _BENCH
    from slm_export.devices import resolve_device

    opt = request.config.getoption
    threads = opt("--bench-threads") or torch.get_num_threads()
    torch.set_num_threads(threads)
    device = resolve_device(opt("--bench-device"))
    draft = Path(opt("--bench-draft")) if opt("--bench-draft") else None
    vocab, ngram_data = opt("--bench-draft-vocab"), opt("--bench-ngram-data")
    if opt("--bench-model"):
        model_dir, preset = Path(opt("--bench-model")), Path(opt("--bench-model")).name
    else:
        preset = opt("--bench-preset")
        model_dir = _trained_model(preset, opt("--bench-train-steps") or TRAIN_STEPS[preset],
                                   opt("--bench-refresh"))
        stories = ARTIFACTS / "data" / Source.of(TrainConfig()).name  # what they trained on
        ngram_data = ngram_data or stories
        if draft is None and preset != "tiny" and not opt("--bench-quick"):
            draft = _trained_model("tiny", TRAIN_STEPS["tiny"] * 2, opt("--bench-refresh"))
            vocab = vocab or stories
    bandwidth = bm.measure_read_bandwidth(device, threads)
    _BENCH = Bench(model_dir=model_dir, preset=preset, config=_model_config(model_dir),
                   device=device, threads=threads, quick=opt("--bench-quick"),
                   full=opt("--bench-full"), bandwidth=bandwidth, draft_dir=draft,
                   draft_variant=opt("--bench-draft-variant"),
                   draft_vocab=None if vocab in (None, "none") else Path(vocab),
                   ngram_data=None if ngram_data in (None, "none") else Path(ngram_data))
    return _BENCH


@dataclass
class Case:
    backend_name: str
    variant: str
    backend: object
    load_s: float
    file_mb: float  # what a deployment ships: the checkpoint, or the export file loaded
    baseline_mb: float | None  # before the backend was built: process RSS, or on CUDA the
    # device memory in use (torch.cuda.mem_get_info), which also sees ONNX Runtime's arena


def _file_mb(name: str, variant: str, model_dir: Path) -> float:
    """Size of the file ``load_backend`` reads for this backend and variant."""
    from slm_export.artifacts.manifest import Manifest
    from slm_export.runtime import TORCH_BACKENDS, resolve_model_path

    target = resolve_model_path(name, model_dir)
    if name not in TORCH_BACKENDS:
        kind = {"torchscript": "torchscript_kv", "aoti": "aoti_kv", "ort": "onnx_kv"}[name]
        target = Manifest.read(target, verify_hashes=False).file(kind, variant, verify_hash=False)
    return target.stat().st_size / 2**20


@pytest.fixture(scope="session")
def case(request, bench) -> Case:
    """The backend under test, built once and released before the next backend is built."""
    from slm_export.runtime import load_backend

    name, variant = request.param
    if name == "aoti":
        from slm_export.export.aoti import compiler_problem

        if problem := compiler_problem():  # no model_kv.pt2 can be built on this machine
            pytest.skip(f"aoti: {problem}")
    bench.mem.reset()
    baseline = bench.mem.rss_mb()
    if bench.device.type == "cuda":  # CUDA-only: run by scripts/gpu-check.sh
        torch.cuda.empty_cache()
        baseline = bm.cuda_used_mb(bench.device)
    start = time.perf_counter()
    # A backend that cannot load fails its rows: a broken backend must not drop out of the
    # table quietly (exclude one on purpose with --bench-backends).
    backend = load_backend(name, bench.model_dir, bench.device, variant=variant,
                           threads=bench.threads)
    load_s = time.perf_counter() - start
    assert backend.device.type == bench.device.type, (backend.device, bench.device)
    yield Case(name, variant, backend, load_s, _file_mb(name, variant, bench.model_dir), baseline)
    del backend
    bench.mem.trim()


def write_results(b: Bench, path: str) -> Path:
    """results.json with every row so far (called after each row, so a killed run keeps them)."""
    return bm.write_results(path, bm.machine_info(b.threads), b.results, extra={
        "bandwidth_gb_s": round(b.bandwidth / 1e9, 2),
        "roofline_tokens_per_s_fp32_batch1": round(bm.roofline_tokens_per_s(b.bandwidth, b.config), 1),
        "model": str(b.model_dir),
        "draft_model": None if b.draft_dir is None else str(b.draft_dir),
        "draft_variant": b.draft_variant,
        "draft_vocab": None if b.draft_vocab is None else str(b.draft_vocab),
        "ngram_data": None if b.ngram_data is None else str(b.ngram_data),
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
    console = Console(file=terminalreporter._tw._file, force_terminal=False, width=220)
    load = f", load avg {machine['load_avg'][0]:.2f}" if machine["load_avg"] else ""
    console.print(bm.results_table(b.results, title=(
        f"slm-export bench: {b.preset} on {machine['gpu'] or machine['cpu']}, {b.threads} threads, "
        f"read bandwidth {b.bandwidth / 1e9:.1f} GB/s -> fp32 roofline {ceiling:.0f} tok/s "
        f"at batch 1{load}, commit {machine['commit']}")))
    console.print(f"results written to {os.fspath(path)}")
