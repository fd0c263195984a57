"""The results file: machine facts, one row per measured scenario, and every comparison's raw
timings. ``bench/`` writes it (``artifacts/bench/results.json``); the tables and charts read
it (``report.py``, ``plots.py``), so a published figure is always derived from this file.

- ``machine``: commit, CPU, cores, threads, GPU, library versions, load average, date.
- ``results[]``: ``Result`` rows (backend, variant, device, preset, batch, new tokens,
  tokens/s and its spread, time to first token, step latency, peak memory, roofline share,
  file size, load and compile time, how the first round was checked).
- ``comparisons[]``: ``Comparison`` records, each one call of ``measure.interleaved``: the
  candidates' seconds per round and the tokens each call produced. A gain is derived from
  them (``Comparison.gain``), never stored.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from slm_export.benchmark.measure import gain

SCHEMA = 2  # 2: comparisons with raw seconds
RESULT_FIELDS = ("backend", "variant", "device", "preset", "batch", "new_tokens", "tokens_per_s",
                 "ttft_ms", "peak_mem_mb", "roofline_pct")
MACHINE_FIELDS = ("commit", "cpu", "cores", "threads", "gpu", "torch", "onnxruntime", "onnx",
                  "python", "date")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def git_commit() -> str | None:
    """The checkout's commit (with "+dirty" if it has uncommitted changes), or None."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine_info(threads: int, commit: str | None = None) -> dict[str, Any]:
    """Where a run ran. ``commit``: the code measured, read when the run started (default: now;
    a run that rewrites a tracked results file would otherwise call its own checkout dirty)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "commit": commit or git_commit(), "cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads,
        "gpu": gpu, "torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"), "python": platform.python_version(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.date.today().isoformat(),
    }


@dataclass
class Result:
    """One row of the table and of results.json.

    scenario "decode": a 4-token prompt then ``new_tokens`` greedy tokens per row through the
    shared loop (overflow re-prefills included); tokens_per_s counts new tokens of all rows,
    ttft_ms is prefill + first sample. "speculative": the same with a drafter. "prefill": one
    prefill of ``prompt_tokens`` plus the first sample (new_tokens 1); tokens_per_s there is
    prompt tokens per second. "serve": C concurrent streaming clients of ``slm-serve``
    (``batch`` is C; tokens_per_s the aggregate).
    """

    backend: str
    variant: str
    device: str
    preset: str
    batch: int
    new_tokens: int
    tokens_per_s: float
    ttft_ms: float | None
    peak_mem_mb: float | None
    roofline_pct: float | None
    compile_s: float | None = None
    scenario: str = "decode"
    prompt_tokens: int = 4
    rounds: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # spread, latency, checks, ...

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        if d["compile_s"] is None:
            d.pop("compile_s")
        return {**d, **extra}


@dataclass
class Comparison:
    """One comparison's raw timings: ``candidates[name]`` = {"seconds": [per round], "tokens":
    what one call produced, and what it was (backend, variant, batch, drafter, ...)}; the
    gain reported is ``subject``'s over ``base``'s."""

    kind: str  # "vs naive", "batch", "speculative", "engine"
    subject: str
    base: str
    candidates: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def comparison_gain(c: dict[str, Any]) -> float:
    """The subject's speed over the base's, from the raw seconds (``measure.gain``)."""
    a, b = c["candidates"][c["subject"]], c["candidates"][c["base"]]
    return gain(a["seconds"], b["seconds"], a["tokens"], b["tokens"])


def comparison_range(c: dict[str, Any]) -> tuple[float, float]:
    """The lowest and highest per-round ratio."""
    a, b = c["candidates"][c["subject"]], c["candidates"][c["base"]]
    ratios = [(a["tokens"] / x) / (b["tokens"] / y) for x, y in zip(a["seconds"], b["seconds"], strict=True)]
    return min(ratios), max(ratios)


def median_tokens_per_s(candidate: dict[str, Any]) -> float:
    return candidate["tokens"] / statistics.median(candidate["seconds"])


def write_results(path: str | os.PathLike, machine: dict[str, Any], results: list[Result],
                  comparisons: list[Comparison] = (), extra: dict[str, Any] | None = None) -> Path:
    """Write the results file atomically."""
    doc = {"schema": SCHEMA, "machine": machine, "results": [r.to_json() for r in results],
           "comparisons": [c.to_json() for c in comparisons], **(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def check_results(doc: dict[str, Any]) -> None:
    """Raise ValueError unless ``doc`` is a results file of this schema."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"results file schema {doc.get('schema')!r}, this version reads {SCHEMA}")
    if not isinstance(doc.get("machine"), dict) or not isinstance(doc.get("results"), list):
        raise ValueError("a results file needs a 'machine' object and a 'results' list")
    missing = [k for k in MACHINE_FIELDS if k not in doc["machine"]]
    if missing:
        raise ValueError(f"machine is missing {missing}")
    for i, row in enumerate(doc["results"]):
        missing = [k for k in RESULT_FIELDS if k not in row]
        if missing:
            raise ValueError(f"results[{i}] is missing {missing}")
    for i, c in enumerate(doc.get("comparisons", [])):
        cands = c.get("candidates", {})
        if c.get("subject") not in cands or c.get("base") not in cands or any(
                len(x.get("seconds", [])) != len(cands[c["base"]]["seconds"]) for x in cands.values()):
            raise ValueError(f"comparisons[{i}] needs a subject and a base with one time per round")


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    check_results(doc)
    return doc
