"""Benchmark suite setup: options, the model under test, one backend at a time, the results.

Run explicitly (``testpaths`` is ``tests``, so a plain ``pytest`` never collects this folder):

    pytest bench --benchmark-only                                  # 30m architecture, all backends
    pytest bench --benchmark-only --bench-preset tiny --bench-quick  # the CI smoke run

The model: ``--bench-model DIR`` (a run folder holding best.pt and export/), else the
``--bench-preset`` architecture trained briefly on the embedded stories
(``training.train_brief``) and exported with every variant, once, under
``artifacts/bench/model-<preset>-<steps>steps/``. Decode speed does not depend on the
weights, but the first-round checks and speculative decoding (acceptance) only mean
something on a model that has learned text. For the 30m preset the tiny one is trained too:
it is the draft model of the speculative rows.

A backend that fails to load fails its rows (only ``--bench-backends`` excludes one). Every
ratio comes from one comparison timed in interleaved rounds (``benchmark.interleaved``),
its raw seconds kept in the results file.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from slm_export import benchmark as bm
from slm_export import registry

ARTIFACTS = Path("artifacts/bench")
TRAIN_STEPS = {"30m": 300, "tiny": 300}  # tiny: its recipe's own length (fewer left int4 marginal)


def pytest_addoption(parser):
    g = parser.getgroup("slm-export bench")
    g.addoption("--bench-model", default=None,
                help="a run folder (best.pt + export/) to benchmark (default: the preset, trained briefly)")
    g.addoption("--bench-preset", default="30m", help="architecture of the default model (30m, tiny)")
    g.addoption("--bench-train-steps", type=int, default=None,
                help="training steps of the default model (default 300)")
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
    g.addoption("--bench-engines", action="store_true",
                help="also time other engines on our weights: CTranslate2, llama.cpp "
                     "(bench/test_engines.py)")
    g.addoption("--bench-llama-cpp", default=None,
                help="a llama.cpp source tree: its convert_hf_to_gguf.py writes the GGUF files "
                     "of the llama.cpp rows (--bench-engines)")
    g.addoption("--bench-refresh", action="store_true", help="train and export the cached model again")
    g.addoption("--bench-results", default=str(ARTIFACTS / "results.json"),
                help="where to write the results JSON")
    g.addoption("--bench-charts", default=str(ARTIFACTS / "charts"),
                help="where to draw the run's charts (python -m slm_export.benchmark FILE --plot DIR)")


def case_id(backend: str, variant: str) -> str:
    return backend if variant == "fp32" else f"{backend}-{variant}"


def _wanted(text: str | None) -> set | None:
    """--bench-backends as (backend, variant) pairs; None without it."""
    if not text:
        return None
    known = {case_id(*c): c for c in registry.cases()}
    names = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise pytest.UsageError(f"--bench-backends: unknown {unknown}; choose from {list(known)}")
    return {known[n] for n in names}


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    device = metafunc.config.getoption("--bench-device")
    cases = registry.cases("cuda" if device == "cuda" else "cpu")
    wanted = _wanted(metafunc.config.getoption("--bench-backends"))
    if wanted:
        cases = [c for c in registry.cases() if c in wanted]
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
    wanted: set | None = None  # --bench-backends as (backend, variant) pairs; None: all
    engines: bool = False  # --bench-engines
    mem: bm.RssPeak = field(default_factory=bm.RssPeak)
    commit: str | None = field(default_factory=bm.git_commit)  # the code measured, at the start
    results: list[bm.Result] = field(default_factory=list)
    comparisons: list[bm.Comparison] = field(default_factory=list)
    _backends: dict = field(default_factory=dict)
    _reference: dict = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        """Timed rounds per row and per comparison."""
        return 3 if self.quick else 5

    def shared(self, name: str, variant: str = "fp32", device=None):
        """A backend loaded once per session (the eager reference, naive, ort beside an engine)."""
        from slm_export.runtime import load_backend

        key = (name, variant, str(device or self.device))
        if key not in self._backends:
            self._backends[key] = load_backend(name, self.model_dir, device or self.device, variant,
                                               **({"threads": self.threads} if name == "ort" else {}))
        return self._backends[key]

    @property
    def eager(self):
        return self.shared("eager")

    def reference(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Eager's greedy tokens for these prompts (computed once)."""
        from slm_export.runtime import GREEDY, generate

        key = (tuple(map(tuple, prompts)), new_tokens)
        if key not in self._reference:
            self._reference[key] = generate(self.eager, prompts, max_new_tokens=new_tokens,
                                            sampling=GREEDY, stop_id=None).tokens
        return self._reference[key]

    def write(self, path: str | os.PathLike) -> Path:
        """The results file with every row and comparison so far (after each test: a killed
        run keeps them)."""
        ceiling = bm.roofline_tokens_per_s(self.bandwidth, self.config)
        machine = bm.machine_info(self.threads, self.commit)
        return bm.write_results(path, machine, self.results, self.comparisons, extra={
            "bandwidth_gb_s": round(self.bandwidth / 1e9, 2),
            "roofline_tokens_per_s_fp32_batch1": round(ceiling, 1),
            "model": str(self.model_dir), "preset": self.preset,
            "draft_model": None if self.draft_dir is None else str(self.draft_dir),
            "draft_variant": self.draft_variant,
            "draft_vocab": None if self.draft_vocab is None else str(self.draft_vocab),
            "ngram_data": None if self.ngram_data is None else str(self.ngram_data),
        })


_BENCH: Bench | None = None


def _formats() -> tuple[str, ...]:
    """Every format whose files a backend here loads (aoti where a C++ compiler is found), and
    hf/ where transformers is installed (the other engines' converters read it)."""
    from slm_export.export.aoti import compiler_problem

    formats = [f for f in registry.formats_for(registry.NAMES) if f != "aoti" or not compiler_problem()]
    return (*formats, *(["hf"] if importlib.util.find_spec("transformers") else []))


def _trained_model(preset: str, steps: int, refresh: bool) -> Path:
    """artifacts/bench/model-<preset>-<steps>steps/: ``training.train_brief`` on the embedded
    stories, exported (every format here, every variant) and verified; reused while its
    export's manifest is valid and complete."""
    from slm_export.artifacts.manifest import Manifest
    from slm_export.export import build
    from slm_export.training import train_brief

    run_dir = ARTIFACTS / f"model-{preset}-{steps}steps"
    try:
        manifest = Manifest.read(run_dir / "export", verify_hashes=False)
        complete = all(manifest.has("onnx_kv", v) for v in registry.REDUCED) and (
            "aoti" not in _formats() or manifest.has("aoti_kv"))
        if not refresh and complete:
            return run_dir
    except Exception:
        pass  # none yet, or a partial or older one: train and export again
    start = time.perf_counter()
    shutil.rmtree(run_dir, ignore_errors=True)
    best = train_brief(preset, steps, run_dir, ARTIFACTS / "data")
    build(best, run_dir / "export", formats=_formats(), variants=registry.REDUCED)
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
    from slm_export.data import Source
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
        stories = ARTIFACTS / "data" / Source.of().name  # what they trained on
        ngram_data = ngram_data or stories
        if draft is None and preset != "tiny" and not opt("--bench-quick"):
            draft = _trained_model("tiny", TRAIN_STEPS["tiny"], opt("--bench-refresh"))
            vocab = vocab or stories
    _BENCH = Bench(model_dir=model_dir, preset=preset, config=_model_config(model_dir),
                   device=device, threads=threads, quick=opt("--bench-quick"),
                   full=opt("--bench-full"), bandwidth=bm.measure_read_bandwidth(device, threads),
                   draft_dir=draft, draft_variant=opt("--bench-draft-variant"),
                   draft_vocab=None if vocab in (None, "none") else Path(vocab),
                   ngram_data=None if ngram_data in (None, "none") else Path(ngram_data),
                   wanted=_wanted(opt("--bench-backends")), engines=opt("--bench-engines"))
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
    from slm_export.runtime import resolve_model_path

    spec, target = registry.backend(name), resolve_model_path(name, model_dir)
    if not spec.from_checkpoint:
        target = Manifest.read(target, verify_hashes=False).file(spec.loads, variant, verify_hash=False)
    return target.stat().st_size / 2**20


def _skip_reason(name: str, bench: Bench) -> str | None:
    """Why a backend has no row here: aoti without a C++ compiler (no package was built), or
    on CUDA with the bench's own model (its package is compiled for the CPU; a package runs
    on the device type it was compiled for)."""
    if name != "aoti":
        return None
    from slm_export.export.aoti import compiler_problem

    if problem := compiler_problem():
        return f"aoti: {problem}"
    if bench.device.type != "cpu" and bench.model_dir.parent == ARTIFACTS:
        return ("aoti: the bench's model_kv.pt2 is compiled for the CPU; export one with "
                "export.py --format aoti --device cuda and pass its run folder as --bench-model")
    return None


@pytest.fixture(scope="session")
def case(request, bench) -> Case:
    """The backend under test, built once and released before the next backend is built."""
    from slm_export.runtime import load_backend

    name, variant = request.param
    if reason := _skip_reason(name, bench):
        pytest.skip(reason)
    bench.mem.reset()
    baseline = bench.mem.rss_mb()
    if bench.device.type == "cuda":  # CUDA-only: run by scripts/gpu-check.sh
        torch.cuda.empty_cache()
        baseline = bm.cuda_used_mb(bench.device)
    start = time.perf_counter()
    # A backend that cannot load fails its rows: a broken backend must not drop out of the
    # table quietly (exclude one on purpose with --bench-backends).
    options = {"threads": bench.threads} if name == "ort" else {}
    backend = load_backend(name, bench.model_dir, bench.device, variant, **options)
    load_s = time.perf_counter() - start
    assert backend.device.type == bench.device.type, (backend.device, bench.device)
    yield Case(name, variant, backend, load_s, _file_mb(name, variant, bench.model_dir), baseline)
    del backend
    bench.mem.trim()


def pytest_runtest_teardown(item):
    if _BENCH is not None and (_BENCH.results or _BENCH.comparisons):
        _BENCH.write(item.config.getoption("--bench-results"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _BENCH is None or not _BENCH.results:
        return
    from rich.console import Console

    b = _BENCH
    machine = bm.machine_info(b.threads, b.commit)
    ceiling = bm.roofline_tokens_per_s(b.bandwidth, b.config)
    path = b.write(config.getoption("--bench-results"))
    doc = bm.load_results(path)
    console = Console(file=terminalreporter._tw._file, force_terminal=False, width=220)
    load = f", load avg {machine['load_avg'][0]:.2f}" if machine["load_avg"] else ""
    console.print(bm.results_table(doc["results"], title=(
        f"slm-export bench: {b.preset} on {machine['gpu'] or machine['cpu']}, {b.threads} threads, "
        f"read bandwidth {b.bandwidth / 1e9:.1f} GB/s -> fp32 roofline {ceiling:.0f} tok/s "
        f"at batch 1{load}, commit {machine['commit']}")))
    if doc["comparisons"]:
        console.print("paired comparisons (interleaved rounds):\n" + bm.comparisons_table(doc))
    console.print(f"results written to {os.fspath(path)}")
    from slm_export.benchmark import plots

    charts = plots.draw(doc, config.getoption("--bench-charts"))
    console.print(f"charts drawn in {config.getoption('--bench-charts')}: "
                  + ", ".join(c.name for c in charts if c.suffix == ".png"))
