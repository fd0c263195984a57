"""Per-backend speed: decode tokens/s, inter-token latency, time to first token, memory, and
speculative decoding (see conftest.py for the model and the backends).

Every scenario runs greedy decoding through the one generation loop users run
(``runtime.TokenStream``) with no stop token, so each row emits exactly ``new_tokens``
tokens per prompt. A row's first round (compilation happens there: ``first_call_s``, and
``compile_s`` from torch.compile's own timers) is untimed and checked against eager: fp32
backends must give eager's greedy tokens, int8 / fp16 its top-1 choices (>= MIN_TOP1,
teacher-forced along eager's continuation). Then ``pytest-benchmark`` times at least
``min_rounds`` rounds (fewer only where one round is longer than the row's time cap), and
the row keeps min / median / max tokens/s and the p50 / p95 decode-step latency.
"""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch

from slm_export import benchmark as bm
from slm_export.cli.generate import DRAFT_VOCAB_SIZE
from slm_export.runtime import GREEDY, TokenStream
from slm_export.runtime.base import host_threads
from slm_export.runtime.draft_vocab import frequent_tokens
from slm_export.runtime.ngram_table import NgramTable
from slm_export.runtime.speculative import ModelDrafter, NgramDrafter, load_draft

PROMPT = [7454, 2402, 257, 640]  # "Once upon a time" in GPT-2 BPE: a 4-token prompt
MIN_TOP1 = {"int8": 0.9, "int4": 0.85, "fp16": 0.98}  # agreement with eager's top-1 choices
DRAFT_TOKENS = {"ngram": 4, "ngram+data": 4, "draft": 6}  # at most: drafts stop where unsure


def _prompt_ids(length: int, vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(length)
    return torch.randint(0, vocab, (length,), generator=gen).tolist()


def run_stream(backend, prompts, new_tokens: int, drafter=None, draft_tokens: int = 4):
    """The loop users run, timing each step: -> (Generation, seconds per decode step)."""
    stream = TokenStream(backend, prompts, max_new_tokens=new_tokens, sampling=GREEDY,
                         stop_id=None, drafter=drafter, draft_tokens=draft_tokens)
    steps = []
    with host_threads(backend):  # as generate() and generate.py run it
        while True:
            start = time.perf_counter()
            try:
                next(stream)
            except StopIteration:
                break
            steps.append(time.perf_counter() - start)
    return stream.result(), steps[1:]  # the first step is the prefill (TTFT)


def _compile_seconds() -> float:
    from torch._dynamo.utils import compilation_time_metrics

    return sum(compilation_time_metrics.get("_compile.compile_inner", []))


@torch.inference_mode()
def top1_agreement(backend, reference, prompts, tokens) -> float:
    """Share of positions where ``backend`` and ``reference`` pick the same next token,
    both fed ``tokens`` (eager's greedy continuation, cut to the window) after ``prompts``."""
    ids = torch.tensor(prompts)
    room = backend.config.block_size - ids.size(1)
    fed = torch.tensor(tokens)[:, :room]
    agree = []
    for b in (backend, reference):
        _, state = b.prefill(ids.to(b.device), None)
        logits, _ = b.score(fed.to(b.device), state)
        agree.append(logits.argmax(-1).cpu())
    return (agree[0][:, :-1] == agree[1][:, :-1]).float().mean().item()


def check_first_round(bench, case, prompts, tokens) -> dict:
    """fp32 backends: eager's exact greedy tokens; variants: its top-1 choices."""
    want = bench.reference(prompts, len(tokens[0]))
    if case.variant == "fp32":
        assert tokens == want, f"{case.backend_name} gives other greedy tokens than eager"
        return {"parity": "identical greedy tokens"}
    agree = top1_agreement(case.backend, bench.eager, prompts, want)
    assert agree >= MIN_TOP1[case.variant], f"{case.variant} top-1 agreement {agree:.3f}"
    return {"parity": f"top-1 agreement {agree:.3f}"}


def _measure(benchmark, bench, case, call, before_each=None):
    """One untimed call (-> first_call_s, and compile_s from torch.compile's own timers), a
    second one where it compiled (a re-prefill may specialise once more), then min_rounds
    timed calls, fewer only where they would pass the row's time cap. ``before_each`` runs
    before every timed call, outside its timing (pytest-benchmark's setup).
    -> (first output, [(output, seconds)], compile_s or None, extras, peak MB)."""
    bench.mem.reset()
    compiled_before = _compile_seconds()
    start = time.perf_counter()
    first = call()
    bm.sync(bench.device)
    first_s = time.perf_counter() - start
    if _compile_seconds() > compiled_before:
        call()
    compile_s = _compile_seconds() - compiled_before
    one_call = max(first_s - compile_s, 1e-3)
    rounds = max(1, min(bench.min_rounds, math.floor(bench.max_seconds / one_call)))
    outs: list = []

    def timed():
        t0 = time.perf_counter()
        out = call()
        bm.sync(bench.device)
        outs.append((out, time.perf_counter() - t0))

    benchmark.pedantic(timed, setup=before_each, rounds=rounds, iterations=1, warmup_rounds=0)
    if bench.device.type == "cuda":
        # Device memory in use now, above what it was before the backend was loaded: ORT's
        # arena and torch's caching allocator both keep their high-water mark reserved, and
        # torch.cuda.max_memory_allocated would not see ORT's allocations at all.
        peak = bm.cuda_used_mb(bench.device) - case.baseline_mb
    else:
        peak = bench.mem.peak_mb(case.baseline_mb)
    return first, outs, (round(compile_s, 2) if compile_s > 0 else None), \
        {"first_call_s": round(first_s, 3)}, peak


def _plain_rounds(bench, case, new_tokens: int):
    """-> (a function that times one plain greedy batch-1 generation of ``new_tokens``, the
    list it appends the seconds to): ``_measure``'s ``before_each`` for paired rounds. It runs
    once untimed here (a compiled backend compiles batch 1 now, not in a pair)."""
    seconds: list[float] = []

    def run():
        start = time.perf_counter()
        run_stream(case.backend, [PROMPT], new_tokens)
        bm.sync(bench.device)
        seconds.append(time.perf_counter() - start)

    run()
    seconds.clear()
    return run, seconds


def _paired(before: list[float], outs: list, scale: float = 1.0) -> float:
    """Median over rounds of ``scale`` x (seconds of the generation run just before a timed
    round, by ``_measure``'s ``before_each``) / (the round's seconds): a speed ratio."""
    return round(statistics.median(
        scale * b / seconds for b, (_, seconds) in zip(before, outs, strict=True)), 3)


def _record(benchmark, bench, case, **fields) -> bm.Result:
    extra = fields.pop("extra", {})
    row = bm.Result(backend=case.backend_name, variant=case.variant, device=bench.device.type,
                    preset=bench.preset, **fields)
    row.extra.update(extra, threads=bench.threads, load_s=round(case.load_s, 3),
                     file_mb=round(case.file_mb, 1),
                     mem_method=("cuda mem_get_info used above the level before loading"
                                 if bench.device.type == "cuda" else "VmHWM above the RSS before loading"))
    bench.results.append(row)
    benchmark.extra_info.update(row.to_json())
    return row


def _throughput_fields(bench, case, batch, new_tokens, outs, extra):
    """tokens/s spread and decode-step latency percentiles from timed (Generation, steps, s)."""
    totals = [seconds for (_, _), seconds in outs]
    tps = [batch * new_tokens / s for s in totals]
    steps = [s for (_, step_times), _ in outs for s in step_times]
    ttfts = [g.stats.time_to_first_token for (g, _), _ in outs]
    itl = bm.spread(steps) if steps else None
    median_tps = batch * new_tokens / statistics.median(totals)
    ceiling = bm.roofline_tokens_per_s(bench.bandwidth, bench.config, batch, case.variant)
    extra.update(tokens_per_s_min=round(min(tps), 1), tokens_per_s_max=round(max(tps), 1),
                 itl_p50_ms=None if itl is None else round(1000 * itl["median"], 3),
                 itl_p95_ms=None if itl is None else round(1000 * itl["p95"], 3))
    return dict(batch=batch, new_tokens=new_tokens, tokens_per_s=median_tps,
                ttft_ms=1000 * statistics.median(ttfts),
                roofline_pct=bm.roofline_pct(median_tps, ceiling), rounds=len(outs))


@pytest.mark.parametrize("batch,new_tokens", [(1, 200), (1, 124), (8, 124), (32, 124)],
                         ids=["b1-200tok", "b1-124tok", "b8-124tok", "b32-124tok"])
def test_decode(benchmark, bench, case, batch, new_tokens):
    """A 4-token prompt, then ``new_tokens`` greedy tokens per row. 200 crosses the 128-token
    window, so the overflow re-prefill is part of the figure; 124 stays inside it."""
    if bench.quick and (batch, new_tokens) != (1, 200):
        pytest.skip("--bench-quick measures batch 1 / 200 tokens only")
    if case.backend_name == "naive" and batch > 1 and not bench.full and bench.device.type == "cpu":
        pytest.skip("naive at batch > 1 recomputes every window per token (minutes): --bench-full")
    prompts = [PROMPT] * batch

    def call():
        gen, steps = run_stream(case.backend, prompts, new_tokens)
        assert gen.stats.new_tokens == batch * new_tokens
        return gen, steps

    single, singles = _plain_rounds(bench, case, new_tokens) if batch > 1 else (None, [])
    (gen, _), outs, compile_s, extra, peak = _measure(benchmark, bench, case, call, single)
    if singles:  # the batch's gain over batch 1 from rounds side by side (see test_speculative)
        extra["paired_vs_batch1"] = _paired(singles, outs, batch)
    extra.update(check_first_round(bench, case, prompts, gen.tokens))
    _record(benchmark, bench, case, peak_mem_mb=peak, compile_s=compile_s, extra=extra,
            **_throughput_fields(bench, case, batch, new_tokens, outs, extra))


@pytest.mark.parametrize("drafter", ["ngram", "ngram+data", "draft"])
def test_speculative(benchmark, bench, case, drafter):
    """Batch 1, 200 greedy tokens with speculation: tokens/s, the gain over plain greedy from
    paired rounds (a plain generation runs just before each timed one), acceptance rate and
    mean tokens per verify step; the tokens must be the plain greedy ones."""
    if bench.quick:
        pytest.skip("--bench-quick leaves speculative decoding out")
    if case.backend_name == "naive":
        pytest.skip("naive recomputes the window: speculation only multiplies its work")
    if drafter == "draft" and bench.draft_dir is None:
        pytest.skip("no draft model: --bench-draft DIR, or the default 30m run (tiny drafts)")
    if drafter == "ngram+data" and bench.ngram_data is None:
        pytest.skip("no data folder: --bench-ngram-data DIR, or the bench's own model")
    draft_backend = vocab = table = None
    if drafter == "draft":  # as generate.py --draft-backend ort --draft-variant --draft-vocab
        if bench.draft_vocab is not None:
            vocab = frequent_tokens(bench.draft_vocab, DRAFT_VOCAB_SIZE)
        draft_backend = load_draft("ort", bench.draft_dir, case.backend, bench.draft_variant, vocab)
    if drafter == "ngram+data":  # as generate.py --speculative ngram --ngram-data
        table = NgramTable.from_data(bench.ngram_data)

    def call():
        made = ModelDrafter(draft_backend) if drafter == "draft" else NgramDrafter(table=table)
        return run_stream(case.backend, [PROMPT], 200, made, DRAFT_TOKENS[drafter])

    plain_round, plain = _plain_rounds(bench, case, 200)
    (gen, _), outs, compile_s, extra, peak = _measure(benchmark, bench, case, call, plain_round)
    # The gain from rounds taken side by side: the plain row of this backend was measured
    # minutes earlier, when the machine may have run faster or slower.
    extra["paired_speedup"] = _paired(plain, outs)
    extra.update(check_first_round(bench, case, [PROMPT], gen.tokens))
    s = gen.stats
    if drafter == "draft":
        extra.update(draft_variant=bench.draft_variant,
                     draft_vocab=None if vocab is None else len(vocab))
    extra.update(drafter=drafter, draft_tokens=DRAFT_TOKENS[drafter], acceptance=round(s.acceptance or 0, 3),
                 tokens_per_verify_step=round(s.new_tokens / max(1, s.verify_steps), 2))
    fields = _throughput_fields(bench, case, 1, 200, outs, extra)
    _record(benchmark, bench, case, peak_mem_mb=peak, compile_s=compile_s, extra=extra,
            scenario="speculative", **fields)


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

    _, outs, compile_s, extra, peak = _measure(benchmark, bench, case, call)
    seconds = statistics.median(s for _, s in outs)
    _record(benchmark, bench, case, batch=1, new_tokens=1, tokens_per_s=prompt_tokens / seconds,
            ttft_ms=1000 * seconds, peak_mem_mb=peak, roofline_pct=None, compile_s=compile_s,
            scenario="prefill", prompt_tokens=prompt_tokens, rounds=len(outs), extra=extra)
