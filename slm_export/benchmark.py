"""Pure helpers for the benchmark suite in ``bench/``: roofline math, memory probes, machine
facts, the results.json schema and the summary table.

Nothing here runs a model; ``bench/conftest.py`` and ``bench/test_backends.py`` do, and call
these helpers so the same numbers reach the terminal table, ``--benchmark-json`` and
``artifacts/bench/results.json``.

Roofline: decoding one token (per row) reads every weight the forward pass touches once:
all block weights, the final LayerNorm and the output projection (vocab x n_embd), but not
the token-embedding table (one row is gathered) nor the position table. At batch B one
weight read serves B tokens, so the memory-bound ceiling is
``B * read_bandwidth / bytes_per_step`` tokens/s. The bandwidth is measured on the same device
with the same thread count (``measure_read_bandwidth``). KV-cache reads (<= 2.4 MB per step
for ``30m`` at batch 1) are left out, as they are next to ~120 MB of weights.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from slm_export.config import GPTConfig
from slm_export.runtime.base import BACKENDS

# Bytes per weight of the matrices (Linear / Gemm / MatMul) for each weight dtype a variant
# stores; LayerNorm weights and biases stay fp32 in every variant we export.
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1,
                "int4": 0.5 + 4 / 32}  # 4 bits plus an fp32 scale per block of 32

RESULT_FIELDS = ("backend", "variant", "device", "preset", "batch", "new_tokens", "tokens_per_s",
                 "ttft_ms", "peak_mem_mb", "roofline_pct")


# --- roofline ---------------------------------------------------------------------------------

def decode_weight_params(config: GPTConfig) -> tuple[int, int]:
    """Parameters read per decode step -> (matrix params, vector params).

    Matrices: per block c_attn (C x 3C), attn c_proj (C x C), c_fc (C x 4C), mlp c_proj (4C x C),
    i.e. 12 C^2, plus lm_head (V x C). Vectors: LayerNorm weights (and biases), Linear biases.
    """
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    matrices = L * 12 * C * C + V * C
    ln_per_block = 2 * (2 * C if config.bias else C)  # ln_1, ln_2
    linear_bias_per_block = (3 * C + C + 4 * C + C) if config.bias else 0
    ln_f = 2 * C if config.bias else C
    vectors = L * (ln_per_block + linear_bias_per_block) + ln_f
    return matrices, vectors


def bytes_per_decode_step(config: GPTConfig, weight_dtype: str = "fp32") -> int:
    """Bytes of weights one decode step reads (the same for any batch size)."""
    matrices, vectors = decode_weight_params(config)
    return matrices * WEIGHT_BYTES[weight_dtype] + vectors * 4


def roofline_tokens_per_s(bandwidth_bytes_per_s: float, config: GPTConfig, batch: int = 1,
                          weight_dtype: str = "fp32") -> float:
    """Memory-bound ceiling on decode tokens/s (all rows together) at this batch size."""
    return batch * bandwidth_bytes_per_s / bytes_per_decode_step(config, weight_dtype)


def roofline_pct(tokens_per_s: float, ceiling_tokens_per_s: float) -> float:
    return 100.0 * tokens_per_s / ceiling_tokens_per_s


def sync(device: torch.device | str) -> None:
    """Wait for queued device work before reading a clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_read_bandwidth(device: torch.device | str = "cpu", threads: int | None = None,
                           megabytes: int = 256, repeats: int = 5) -> float:
    """Best-of-``repeats`` read bandwidth (bytes/s) of ``tensor.sum()`` over ``megabytes`` of fp32.

    A reduction reads every byte once and writes nothing, which is what a matrix-vector product
    over the weights does; it runs with ``threads`` torch threads (the benchmark's count).
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
        x.sum()  # first touch / warm-up
        sync(device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            x.sum()
            sync(device)
            best = min(best, time.perf_counter() - start)
        return x.numel() * 4 / best
    finally:
        torch.set_num_threads(previous)


# --- memory -----------------------------------------------------------------------------------

def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssPeak:
    """Peak resident memory of this process over a stretch of work, above a baseline (Linux).

    ``reset()`` trims freed heap back to the OS, then resets the kernel's high-water mark
    (``VmHWM``) to the current RSS via ``/proc/self/clear_refs``; ``peak_mb(baseline_mb)`` reads
    the high-water mark since then, minus ``baseline_mb`` (the RSS before the backend was loaded,
    so a backend's weights and caches count, the interpreter and libraries do not).
    ``available`` is False where the kernel files are missing (non-Linux).
    """

    def __init__(self):
        self.available = _status_kb("VmHWM") is not None and os.path.exists("/proc/self/clear_refs")

    @staticmethod
    def trim() -> None:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def rss_mb(self) -> float | None:
        kb = _status_kb("VmRSS")
        return None if kb is None else kb / 1024

    def reset(self) -> None:
        self.trim()
        if not self.available:
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.available = False

    def peak_mb(self, baseline_mb: float) -> float | None:
        kb = _status_kb("VmHWM") if self.available else None
        return None if kb is None else max(0.0, kb / 1024 - baseline_mb)


def cuda_used_mb(device: torch.device | str) -> float:
    """Device memory in use on ``device`` by every allocator of every process (MB), as the
    driver reports it: the one figure that sees ONNX Runtime's CUDA arena too."""
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return (total - free) / 2**20


# --- machine facts ----------------------------------------------------------------------------

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

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine_info(threads: int) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "commit": git_commit(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "gpu": gpu,
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "python": platform.python_version(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# --- results ----------------------------------------------------------------------------------

@dataclass
class Result:
    """One row of the table and of results.json.

    scenario "decode": a 4-token prompt then ``new_tokens`` greedy tokens per row through the
    shared loop (overflow re-prefills included); tokens_per_s counts new tokens of all rows,
    ttft_ms is prefill + first sample. scenario "prefill": one prefill of ``prompt_tokens``
    plus the first sample (new_tokens 1); tokens_per_s there is prompt tokens per second.
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


SPEEDUP_KEY = ("scenario", "device", "preset", "batch", "new_tokens", "prompt_tokens")


def fill_speedups(rows: list[dict[str, Any]]) -> None:
    """Set ``speedup_vs_naive`` on every results.json row that has a naive row with the same
    scenario, device, preset, batch and lengths."""
    naive = {tuple(r.get(k) for k in SPEEDUP_KEY): r for r in rows if r["backend"] == "naive"}
    for r in rows:
        base = naive.get(tuple(r.get(k) for k in SPEEDUP_KEY))
        r["speedup_vs_naive"] = (r["tokens_per_s"] / base["tokens_per_s"]
                                 if base and base["tokens_per_s"] else None)


def write_results(path: str | os.PathLike, machine: dict[str, Any], results: list[Result],
                  extra: dict[str, Any] | None = None) -> Path:
    """Write {"machine": ..., "results": [...]} (plus ``extra`` top-level keys) as JSON."""
    rows = [r.to_json() for r in results]
    fill_speedups(rows)
    doc = {"machine": machine, "results": rows, **(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def check_results(doc: dict[str, Any]) -> None:
    """Raise ValueError unless ``doc`` has the shape other tools read."""
    if not isinstance(doc.get("machine"), dict) or not isinstance(doc.get("results"), list):
        raise ValueError("results.json needs a 'machine' object and a 'results' list")
    for key in ("cpu", "cores", "threads", "gpu", "torch", "onnxruntime", "onnx", "python"):
        if key not in doc["machine"]:
            raise ValueError(f"machine is missing {key!r}")
    for i, row in enumerate(doc["results"]):
        missing = [k for k in RESULT_FIELDS if k not in row]
        if missing:
            raise ValueError(f"results[{i}] is missing {missing}")


def spread(values: list[float]) -> dict[str, float]:
    """min, median, max and the 95th percentile (nearest rank) of a list of timings."""
    ordered = sorted(values)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return {"min": ordered[0], "median": statistics.median(ordered), "max": ordered[-1], "p95": p95}


# --- table ------------------------------------------------------------------------------------

COLUMNS = (("backend", "backend"), ("variant", "variant"), ("scenario", "scenario"),
           ("batch", "batch"), ("prompt", "prompt_tokens"), ("new tok", "new_tokens"),
           ("tokens/s", "tokens_per_s"), ("min-max", "tokens_per_s_range"),
           ("vs naive", "speedup_vs_naive"), ("TTFT ms", "ttft_ms"),
           ("step ms p50/p95", "itl_ms"), ("mem MB", "peak_mem_mb"),
           ("% roofline", "roofline_pct"), ("compile s", "compile_s"), ("rounds", "rounds"),
           ("checked", "check"))
SCENARIO_ORDER = {"decode": 0, "speculative": 1, "prefill": 2}


def _cell(row: dict[str, Any], key: str) -> str:
    """One table cell of a results.json row."""
    if key == "tokens_per_s_range":
        lo, hi = row.get("tokens_per_s_min"), row.get("tokens_per_s_max")
        return "-" if lo is None else f"{lo:.1f}-{hi:.1f}"
    if key == "itl_ms":
        p50, p95 = row.get("itl_p50_ms"), row.get("itl_p95_ms")
        return "-" if p50 is None else f"{p50:.2f} / {p95:.2f}"
    if key == "check":
        if row.get("acceptance") is not None:
            return (f"{row['parity']}; {row['drafter']} acceptance {row['acceptance']:.0%}, "
                    f"{row['tokens_per_verify_step']} tok/verify")
        return row.get("parity") or "-"
    value = row.get(key)
    if value is None:
        return "-"
    if key == "speedup_vs_naive":
        return f"{value:.2f}x"
    if key in ("peak_mem_mb", "roofline_pct"):
        return f"{value:.0f}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _sorted_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (SCENARIO_ORDER.get(r.get("scenario"), 3), r["batch"],
                                       -r["new_tokens"], r.get("prompt_tokens", 0),
                                       -r["tokens_per_s"]))


def results_table(results: list[Result], title: str = "slm-export benchmark"):
    """A rich Table of the rows (the same cells as ``markdown_table``)."""
    from rich.markup import escape
    from rich.table import Table

    rows = [r.to_json() for r in results]
    fill_speedups(rows)
    table = Table(title=title, show_lines=False)
    for name, _ in COLUMNS:
        table.add_column(name)
    for row in _sorted_rows(rows):
        table.add_row(*(escape(_cell(row, key)) for _, key in COLUMNS))
    return table


def markdown_table(doc: dict[str, Any]) -> str:
    """A results.json as a markdown table: what bench/RESULTS.md publishes, regenerated from
    the committed file so every number is traceable."""
    fill_speedups(doc["results"])
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, key) for _, key in COLUMNS) + " |"
              for r in _sorted_rows(doc["results"])]
    return "\n".join(lines) + "\n"


def _find(rows: list[dict[str, Any]], **want) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in want.items())), None)


def paired_gain(row: dict[str, Any] | None, base: dict[str, Any] | None,
                key: str) -> float | None:
    """``row``'s tokens/s over ``base``'s: the ratio its rounds measured side by side (its
    ``key``: ``paired_speedup`` of a speculative row against plain greedy, ``paired_vs_batch1``
    of a batched row against batch 1) where it has one, else the two rows' ratio (results
    files before 2026-12-06)."""
    if row is None:
        return None
    if row.get(key) is not None:
        return row[key]
    return None if base is None else row["tokens_per_s"] / base["tokens_per_s"]


def summary_table(doc: dict[str, Any]) -> str:
    """One markdown row per backend and variant: what a deployment chooses between (file size,
    load time, decode tokens/s at batch 1 / 8 / 32, speculative decoding with its gain over
    plain greedy (``paired_gain``), the 128-token prefill) from a results.json."""
    rows = doc["results"]
    head = ("| backend | variant | file MB | load s | b1 tok/s | b8 tok/s | b32 tok/s | b8 / b1 "
            "| ngram spec. tok/s | ngram+data spec. tok/s | draft spec. tok/s | prefill 128 ms "
            "| peak mem MB |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]

    def tps(row):
        return "-" if row is None else f"{row['tokens_per_s']:.1f}"

    def spec(drafter, plain):
        row = _find(same, scenario="speculative", drafter=drafter)
        if row is None:
            return "-"
        gain = paired_gain(row, plain, "paired_speedup")
        return f"{row['tokens_per_s']:.1f}" + ("" if gain is None else f" ({gain:.2f}x)")

    seen: list[tuple[str, str]] = []
    for r in _sorted_rows(rows):
        if (r["backend"], r["variant"]) not in seen:
            seen.append((r["backend"], r["variant"]))
    for backend, variant in seen:
        same = [r for r in rows if r["backend"] == backend and r["variant"] == variant]
        b1, b8, b32 = (_find(same, scenario="decode", batch=b, new_tokens=124) for b in (1, 8, 32))
        plain200 = _find(same, scenario="decode", batch=1, new_tokens=200)
        prefill = _find(same, scenario="prefill", prompt_tokens=128)
        gain = paired_gain(b8, b1, "paired_vs_batch1")
        ratio = "-" if gain is None else f"{gain:.2f}x"
        file_mb, load_s = same[0].get("file_mb"), same[0].get("load_s")
        peak = max((r["peak_mem_mb"] for r in same if r.get("peak_mem_mb") is not None), default=None)
        cells = [backend, variant, "-" if file_mb is None else f"{file_mb:.1f}",
                 "-" if load_s is None else f"{load_s:.2f}", tps(b1), tps(b8), tps(b32), ratio,
                 spec("ngram", plain200), spec("ngram+data", plain200), spec("draft", plain200),
                 "-" if prefill is None else f"{prefill['ttft_ms']:.1f}",
                 "-" if peak is None else f"{peak:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ort_against(engine_row: dict[str, Any] | None, ort_row: dict[str, Any] | None,
                variant: str) -> float | None:
    """ort ``variant``'s speed over another engine's row: from the engine row's paired rounds
    (``ort_paired_ratio``, each of its rounds beside one of ort's) where it has them for that
    variant, else the ratio of the two rows (results files before 2026-12-06)."""
    if engine_row is None:
        return None
    if engine_row.get("ort_paired_variant") == variant:
        return engine_row["ort_paired_ratio"]
    return None if ort_row is None else ort_row["tokens_per_s"] / engine_row["tokens_per_s"]


def _top1(row: dict[str, Any] | None) -> float | None:
    """The top-1 agreement with eager a variant's row was checked with (its parity cell)."""
    m = re.search(r"top-1 agreement ([0-9.]+)", (row or {}).get("parity") or "")
    return float(m.group(1)) if m else None


def _fastest_of_ours(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fp32 batch-1 decode row (124 tokens) of our fastest backend, other engines left out."""
    ours = [r for r in rows if r.get("scenario") == "decode" and r.get("variant") == "fp32"
            and r.get("batch") == 1 and r.get("new_tokens") == 124 and r["backend"] in BACKENDS]
    return max(ours, key=lambda r: r["tokens_per_s"], default=None)


def targets_table(doc: dict[str, Any]) -> str:
    """The speed targets of the project's issues, each met or not, from a results.json:
    batch-1 and batched decode (124 tokens, inside the window), naive as the baseline, ort
    against the other engines (``ort_against``), the speculative rows by their gain over
    plain greedy (``paired_gain``)."""
    rows = doc["results"]

    def decode(backend, variant="fp32", batch=1, new_tokens=124):
        return _find(rows, scenario="decode", backend=backend, variant=variant, batch=batch,
                     new_tokens=new_tokens)

    lines = ["| target | measured | met |", "|---|---|---|"]

    def target(name: str, value: float | None, goal: float, shown: str = "{:.2f}x") -> None:
        """``shown``: how ``value`` is printed (a format string)."""
        cells = ("not measured", "-") if value is None else (
            shown.format(value), "yes" if value >= goal else "no")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")

    def ratio(a, b):
        return None if a is None or b is None else a["tokens_per_s"] / b["tokens_per_s"]

    ort = decode("ort")
    target("ort fp32, batch 1: >= 90% of the fp32 roofline", ort and ort["roofline_pct"], 90,
           "{:.0f}%")
    for backend, goal in (("eager", 2.5), ("torchscript", 2.5), ("compiled", 3.0)):
        r = ratio(decode(backend), decode("naive"))
        target(f"{backend}, batch 1: >= {goal}x naive", r, goal)
    for backend, goal in (("ort", 4.0), ("compiled", 3.0)):
        r = paired_gain(decode(backend, batch=8), decode(backend), "paired_vs_batch1")
        target(f"{backend} fp32: batch 8 >= {goal}x its batch-1 tokens/s", r, goal)
    r = ratio(decode("ort", "int4"), decode("ort", "int8"))
    target("ort int4, batch 1: >= 1.5x int8", r, 1.5)
    target("ort int4: top-1 agreement with fp32 >= 0.95", _top1(decode("ort", "int4")), 0.95,
           "{:.3f}")
    for engine, name, theirs in (("ctranslate2", "CTranslate2", ("float32", "int8")),  # bench
                                 ("llama.cpp", "llama.cpp", ("f32", "q8_0"))):  # --bench-engines
        for ours, their in zip(("fp32", "int8"), theirs, strict=True):
            r = ort_against(decode(engine, their), decode("ort", ours), ours)
            target(f"ort {ours}, batch 1: >= 1x {name} {their} (same run)", r, 1.0)
    fastest = _fastest_of_ours(rows)  # by the rows' medians: so is the ratio, whoever wins
    if fastest is not None:
        target(f"fastest of ours at fp32, batch 1 ({fastest['backend']}): >= 1x llama.cpp f32 "
               "(same run)", ratio(fastest, decode("llama.cpp", "f32")), 1.0)
    for r in sorted((r for r in rows if r.get("scenario") == "speculative"),
                    key=lambda r: (r["backend"], r["variant"], r.get("drafter", ""))):
        name = f"{r['backend']}{'' if r['variant'] == 'fp32' else ' ' + r['variant']}"
        gain = paired_gain(r, decode(r["backend"], r["variant"], new_tokens=200),
                           "paired_speedup")
        target(f"{name} + {r['drafter']} speculation: >= 1.5x its plain greedy", gain, 1.5,
               f"{{:.2f}}x ({r['tokens_per_s']:.0f} tok/s, {r['roofline_pct']:.0f}% of the roofline)")
    return "\n".join(lines) + "\n"


TABLES = {"results": markdown_table, "summary": summary_table, "targets": targets_table}
# A generated block in a markdown file: <!-- results: FILE --> ... <!-- end -->, FILE relative
# to the repository root.
BLOCK = re.compile(r"(<!-- (results|summary|targets): (\S+) -->\n)(.*?)(<!-- end -->)", re.DOTALL)


def regenerate(markdown: str, root: str | os.PathLike = ".") -> str:
    """``markdown`` with every generated block rebuilt from its results file."""
    def table(m: re.Match) -> str:
        doc = json.loads((Path(root) / m.group(3)).read_text())
        check_results(doc)
        return m.group(1) + TABLES[m.group(2)](doc) + m.group(5)

    return BLOCK.sub(table, markdown)


def main(argv=None) -> int:
    """python -m slm_export.benchmark RESULTS_JSON [--summary]: print its markdown table;
    python -m slm_export.benchmark --update FILE.md: rebuild FILE.md's generated blocks."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m slm_export.benchmark")
    parser.add_argument("results", nargs="?", help="a results.json to print as a table")
    parser.add_argument("--summary", action="store_true", help="one row per backend and variant")
    parser.add_argument("--update", metavar="FILE.md",
                        help="rewrite the <!-- results|summary|targets: FILE --> blocks of FILE.md")
    args = parser.parse_args(argv)
    if args.update:
        path = Path(args.update)
        path.write_text(regenerate(path.read_text()))
        return 0
    if not args.results:
        parser.error("give a results.json or --update FILE.md")
    doc = json.loads(Path(args.results).read_text())
    check_results(doc)
    sys.stdout.write((summary_table if args.summary else markdown_table)(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
