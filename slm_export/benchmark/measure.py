"""Measuring: the one primitive that times a comparison, the roofline, memory probes.

``interleaved(candidates, rounds)`` times the candidates of one comparison (batch 8 against
batch 1, speculative against plain, a backend against naive, another engine against ours)
in interleaved rounds: every candidate is warmed up the same way, each call is preceded by
the same settle pause, and each round runs them all in an order rotated by one from the
round before, so no candidate always follows the same one (a thread pool still spinning
after its work slows whoever runs next). It keeps every call's seconds: a ratio is derived
from the raw timings (``gain``: the median over rounds of the per-round speed ratio), never
stored in their place. Given pytest-benchmark's fixture, the primitive lets it time one
candidate (``primary``), so the benchmark's own table shows that candidate's calls.

Roofline: decoding one token (per row) reads every weight the forward pass touches once:
all block weights, the final LayerNorm and the output projection (vocab x n_embd), but not
the token-embedding table (one row is gathered) nor the position table. At batch B one
weight read serves B tokens, so the memory-bound ceiling is
``B * read_bandwidth / bytes_per_step`` tokens/s, the bandwidth measured on the same device
with the same thread count (``measure_read_bandwidth``). KV-cache reads are left out: they
are small next to the weights at these context lengths.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from slm_export.config import GPTConfig

# Bytes per weight of the matrices (Linear / Gemm / MatMul) for each variant's weights;
# LayerNorm weights and biases stay fp32 in every variant we export.
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1,
                "int4": 0.5 + 4 / 32}  # 4 bits plus an fp32 scale per block of 32
# Bytes per parameter of (the blocks' matrices, the vocabulary matrix) of each variant: the
# same for all but mixed (export/onnx.py): its blocks at 4 bits, its head at 8 in blocks of 128.
WEIGHT_BYTES_BY_PART = {v: (b, b) for v, b in WEIGHT_BYTES.items()} | {
    "mixed": (WEIGHT_BYTES["int4"], 1 + 4 / 128)}
SETTLE_S = 0.1  # the pause before every timed call of a comparison


# --- the comparison primitive -------------------------------------------------------------------

@dataclass
class Rounds:
    """What ``interleaved`` measured: ``seconds[name][r]`` for round r, and each candidate's
    output of its first (untimed) warm-up call."""

    seconds: dict[str, list[float]]
    first: dict[str, Any] = field(default_factory=dict)


def order(names: list[str], r: int) -> list[str]:
    """Round ``r``'s running order: ``names`` rotated by r."""
    k = r % len(names)
    return names[k:] + names[:k]


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int, *, warmup: int = 1,
                settle_s: float = SETTLE_S, sync: Callable[[], None] | None = None,
                benchmark=None, primary: str | None = None) -> Rounds:
    """Time ``candidates`` in ``rounds`` interleaved rounds (module docstring).

    ``sync`` runs after each call, inside its timing (a device's queued work); ``benchmark``
    (pytest-benchmark's fixture) times the ``primary`` candidate's calls itself, the others
    running in its setup hook between them.
    """
    names = list(candidates)
    if len(names) < 1 or rounds < 1 or (benchmark is not None and primary not in candidates):
        raise ValueError(f"interleaved: candidates {names}, rounds {rounds}, primary {primary!r}")
    sync = sync or (lambda: None)
    out = Rounds({name: [] for name in names})
    for w in range(warmup):
        for name in order(names, w):
            result = candidates[name]()
            sync()
            out.first.setdefault(name, result)

    def timed(name: str) -> None:
        start = time.perf_counter()
        candidates[name]()
        sync()
        out.seconds[name].append(time.perf_counter() - start)

    schedule = [name for r in range(rounds) for name in order(names, r)]
    if benchmark is None:
        for name in schedule:
            time.sleep(settle_s)
            timed(name)
        return out
    pending = iter(schedule)

    def others_then_settle() -> None:  # pytest-benchmark's setup: untimed by it
        for name in pending:
            time.sleep(settle_s)
            if name == primary:
                return
            timed(name)

    benchmark.pedantic(lambda: timed(primary), setup=others_then_settle, rounds=rounds,
                       iterations=1, warmup_rounds=0)
    for name in pending:  # the round's candidates after the last primary call
        time.sleep(settle_s)
        timed(name)
    return out


def gain(seconds_a: list[float], seconds_b: list[float], work_a: float = 1.0,
         work_b: float = 1.0) -> float:
    """How much faster a is than b: the median over rounds of (work_a / s_a) / (work_b / s_b)."""
    return statistics.median((work_a / a) / (work_b / b)
                             for a, b in zip(seconds_a, seconds_b, strict=True))


# --- roofline -----------------------------------------------------------------------------------

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


def bytes_per_decode_step(config: GPTConfig, variant: str = "fp32") -> int:
    """Bytes of weights one decode step reads (the same for any batch size)."""
    matrices, vectors = decode_weight_params(config)
    head = config.vocab_size * config.n_embd
    blocks_bytes, head_bytes = WEIGHT_BYTES_BY_PART[variant]
    return round((matrices - head) * blocks_bytes + head * head_bytes) + vectors * 4


def roofline_tokens_per_s(bandwidth_bytes_per_s: float, config: GPTConfig, batch: int = 1,
                          variant: str = "fp32") -> float:
    """Memory-bound ceiling on decode tokens/s (all rows together) at this batch size."""
    return batch * bandwidth_bytes_per_s / bytes_per_decode_step(config, variant)


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


# --- memory ------------------------------------------------------------------------------------

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


def spread(values: list[float]) -> dict[str, float]:
    """min, median, max and the 95th percentile (nearest rank) of a list of timings."""
    ordered = sorted(values)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return {"min": ordered[0], "median": statistics.median(ordered), "max": ordered[-1], "p95": p95}
