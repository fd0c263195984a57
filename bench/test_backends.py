"""Per-backend speed: decode tokens/s, time to first token, peak memory (see conftest.py).

Every scenario runs greedy decoding through the one generation loop every user runs
(``slm_export.runtime.generate``) with no stop token, so each row emits exactly
``new_tokens`` tokens. Rounds: warm-up call(s) first (compilation happens there and is
reported as ``compile_s``, never timed), then ``pytest-benchmark`` times whole calls.
"""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch

from slm_export import benchmark as bm
from slm_export.runtime import GREEDY, generate

PROMPT = [7454, 2402, 257, 640]  # "Once upon a time" in GPT-2 BPE: a 4-token prompt


def _prompt_ids(length: int, vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(length)
    return torch.randint(0, vocab, (length,), generator=gen).tolist()


def _measure(benchmark, bench, case, call, warmups: int):
    """Warm up, then time ``call`` for enough rounds; -> (seconds per call list, compile_s, peak MB)."""
    bench.mem.reset()
    warm = []
    for _ in range(warmups):
        start = time.perf_counter()
        call()
        bm.sync(bench.device)
        warm.append(time.perf_counter() - start)
    # Calls longer than the target get a single round, so a slow backend cannot stall the suite.
    rounds = max(1, min(bench.max_rounds, math.ceil(bench.target_s / warm[-1])))
    times: list[float] = []

    def timed():
        start = time.perf_counter()
        out = call()
        bm.sync(bench.device)
        times.append(time.perf_counter() - start)
        return out

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    median = statistics.median(times)
    # Compilation (and first-call setup) = what the warm-up calls took beyond a steady call.
    compile_s = max(0.0, sum(warm) - warmups * median) if case.backend_name == "compiled" else None
    if bench.device.type == "cuda":
        # Device memory in use now, above what it was before the backend was loaded: ORT's
        # arena and torch's caching allocator both keep their high-water mark reserved, and
        # torch.cuda.max_memory_allocated would not see ORT's allocations at all.
        peak = bm.cuda_used_mb(bench.device) - case.baseline_mb
    else:
        peak = bench.mem.peak_mb(case.baseline_mb) if case.baseline_mb is not None else None
    return times, compile_s, peak


def _warmups(case) -> int:
    # compiled: the first call compiles prefill and decode; the second may specialise again
    # (a dynamic prompt length on the overflow re-prefill), so two calls go untimed.
    return 2 if case.backend_name == "compiled" else 1


def _record(benchmark, bench, case, **fields) -> bm.Result:
    row = bm.Result(backend=case.backend_name, variant=case.variant, device=bench.device.type,
                    preset=bench.preset, **fields)
    row.extra["threads"] = bench.threads
    row.extra["mem_method"] = ("cuda mem_get_info used above the level before loading"
                               if bench.device.type == "cuda" else "VmHWM above the RSS before loading")
    row.extra["load_s"] = round(case.load_s, 3)
    bench.results.append(row)
    benchmark.extra_info.update(row.to_json())
    return row


@pytest.mark.parametrize("batch,new_tokens", [(1, 200), (1, 124), (8, 124)],
                         ids=["b1-200tok", "b1-124tok", "b8-124tok"])
def test_decode(benchmark, bench, case, batch, new_tokens):
    """A 4-token prompt, then ``new_tokens`` greedy tokens per row. 200 crosses the 128-token
    window, so the overflow re-prefill is part of the figure; 124 stays inside it."""
    if bench.quick and (batch, new_tokens) != (1, 200):
        pytest.skip("--bench-quick measures batch 1 / 200 tokens only")
    if case.backend_name == "naive" and batch > 1 and not bench.full and bench.device.type == "cpu":
        pytest.skip("naive at batch 8 recomputes 8 windows per token (~3 min on CPU): --bench-full")
    prompts = [PROMPT] * batch
    ttfts: list[float] = []

    def call():
        gen = generate(case.backend, prompts, max_new_tokens=new_tokens, sampling=GREEDY,
                       stop_id=None)
        assert gen.stats.new_tokens == batch * new_tokens
        ttfts.append(gen.stats.time_to_first_token)
        return gen

    warmups = _warmups(case)
    times, compile_s, peak = _measure(benchmark, bench, case, call, warmups)
    tps = batch * new_tokens / statistics.median(times)
    ceiling = bm.roofline_tokens_per_s(bench.bandwidth, bench.config, batch, case.variant)
    _record(benchmark, bench, case, batch=batch, new_tokens=new_tokens, tokens_per_s=tps,
            ttft_ms=1000 * statistics.median(ttfts[warmups:]), peak_mem_mb=peak,
            roofline_pct=bm.roofline_pct(tps, ceiling), compile_s=compile_s, rounds=len(times))


@pytest.mark.parametrize("prompt_tokens", [4, 128], ids=["prompt4", "prompt128"])
def test_time_to_first_token(benchmark, bench, case, prompt_tokens):
    """One prefill of ``prompt_tokens`` plus the first greedy sample, read back to the host."""
    if bench.quick and prompt_tokens != 128:
        pytest.skip("--bench-quick measures the 128-token prefill only")
    ids = torch.tensor([_prompt_ids(prompt_tokens, bench.config.vocab_size)], device=case.backend.device)

    @torch.inference_mode()
    def call():
        logits, _ = case.backend.prefill(ids, None)
        return logits.argmax(-1).tolist()

    times, compile_s, peak = _measure(benchmark, bench, case, call, _warmups(case))
    seconds = statistics.median(times)
    _record(benchmark, bench, case, batch=1, new_tokens=1, tokens_per_s=prompt_tokens / seconds,
            ttft_ms=1000 * seconds, peak_mem_mb=peak, roofline_pct=None, compile_s=compile_s,
            scenario="prefill", prompt_tokens=prompt_tokens, rounds=len(times))
