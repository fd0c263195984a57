"""Per-backend speed: decode tokens/s, inter-token latency, time to first token, memory, and
speculative decoding (see conftest.py for the model and the backends).

Every scenario runs greedy decoding through the one generation loop users run
(``runtime.TokenStream``) with no stop token, so each row emits exactly ``new_tokens``
tokens per prompt. A row's first call (compilation happens there: ``first_call_s``, and
``compile_s`` from torch.compile's own timers) is untimed and checked against eager: fp32
backends must give eager's greedy tokens (or a tie, ``runtime.parity``), the reduced
variants reach their export gate's top-1 agreement. Then its rounds are timed by the one
primitive, ``benchmark.interleaved``, beside what the row is compared with (batch 8 with
batch 1, a drafter with plain greedy, batch 1 with naive); pytest-benchmark times the row's
own calls.
"""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch

from slm_export import benchmark as bm
from slm_export.export import DEFAULT_GATES
from slm_export.export.verify import held_out_tokens
from slm_export.runtime import GREEDY, TokenStream, parity
from slm_export.runtime.draft_vocab import frequent_tokens
from slm_export.runtime.ngram_table import NgramTable
from slm_export.runtime.speculative import ModelDrafter, NgramDrafter, load_draft

PROMPT = [7454, 2402, 257, 640]  # "Once upon a time" in GPT-2 BPE: a 4-token prompt
DRAFT_TOKENS = {"ngram": 4, "ngram+data": 4, "draft": 6}  # at most: drafts stop where unsure
MAX_SECONDS = {True: 10.0, False: 60.0}  # a row's timed seconds at most (quick or not)


class Generations:
    """A callable that runs one greedy generation and keeps what each call gave: the
    ``Generation`` and the seconds of each step after the first (the prefill)."""

    def __init__(self, backend, prompts, new_tokens: int, drafter=None, draft_tokens: int = 4):
        self.backend, self.prompts, self.new_tokens = backend, prompts, new_tokens
        self.drafter, self.draft_tokens = drafter, draft_tokens
        self.outs: list = []

    def __call__(self):
        stream = TokenStream(self.backend, self.prompts, max_new_tokens=self.new_tokens,
                             sampling=GREEDY, stop_id=None,
                             drafter=self.drafter() if self.drafter else None,
                             draft_tokens=self.draft_tokens)
        steps = []
        while True:
            start = time.perf_counter()
            try:
                next(stream)
            except StopIteration:
                break
            steps.append(time.perf_counter() - start)
        gen = stream.result()
        assert gen.stats.new_tokens == len(self.prompts) * self.new_tokens
        self.outs.append((gen, steps[1:]))
        return gen

    @property
    def tokens(self) -> int:
        return len(self.prompts) * self.new_tokens


def _compile_seconds() -> float:
    from torch._dynamo.utils import compilation_time_metrics

    return sum(compilation_time_metrics.get("_compile.compile_inner", []))


def check_first_call(bench, case, prompts, tokens) -> dict:
    """fp32 backends: eager's greedy tokens, or a tie; variants: their export gate's top-1
    agreement with eager, teacher-forced on the held-out text the gate measured the cache
    graph on (one greedy continuation is too few tokens to hold to a gate)."""
    if case.variant == "fp32":
        if tokens == bench.reference(prompts, len(tokens[0])):
            return {"parity": "identical greedy tokens"}
        report = parity.greedy(bench.eager, case.backend, prompts, len(tokens[0])).check()
        return {"parity": f"eager's greedy tokens but {report.tie_count} tie(s)"}
    top1 = parity.teacher_forced(bench.eager, case.backend, held_out_tokens(bench.config))["top1"]
    gate = DEFAULT_GATES[case.variant].min_top1
    assert top1 >= gate, f"{case.variant} top-1 agreement {top1:.3f} < its gate's {gate}"
    return {"parity": f"top-1 agreement {top1:.3f}", "top1_agreement": round(top1, 4)}


def candidate(case_or_name, variant: str, batch: int, new_tokens: int, seconds, **more) -> dict:
    return {"backend": case_or_name, "variant": variant, "batch": batch, "new_tokens": new_tokens,
            "tokens": batch * new_tokens, "seconds": [round(s, 6) for s in seconds], **more}


def measure(benchmark, bench, case, subject: Generations, base: tuple | None = None):
    """The first call (checked, compile timed), then ``interleaved`` rounds of ``subject``
    (pytest-benchmark's) beside ``base`` = (name, Generations) if any.
    -> (Rounds, first Generation, compile_s, first_call_s, peak MB)."""
    bench.mem.reset()
    compiled_before = _compile_seconds()
    start = time.perf_counter()
    first = subject()
    bm.sync(bench.device)
    first_s = time.perf_counter() - start
    compile_s = _compile_seconds() - compiled_before
    one_call = max(first_s - compile_s, 1e-3)
    rounds = max(1, min(bench.rounds, math.floor(MAX_SECONDS[bench.quick] / one_call)))
    candidates = {"subject": subject, **({base[0]: base[1]} if base else {})}
    timed = bm.interleaved(candidates, rounds, sync=lambda: bm.sync(bench.device),
                           benchmark=benchmark, primary="subject")
    if bench.device.type == "cuda":
        # Device memory in use now, above what it was before the backend was loaded: ORT's
        # arena and torch's caching allocator both keep their high-water mark reserved.
        peak = bm.cuda_used_mb(bench.device) - case.baseline_mb
    else:
        peak = bench.mem.peak_mb(case.baseline_mb)
    subject.outs = subject.outs[-rounds:]  # the timed calls' outputs
    return timed, first, (round(compile_s, 2) if compile_s > 0 else None), round(first_s, 3), peak


def record(benchmark, bench, case, **fields) -> bm.Result:
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


def throughput(bench, case, subject: Generations, seconds: list[float], batch: int,
               new_tokens: int, extra: dict) -> dict:
    """tokens/s spread and decode-step latency percentiles of the timed calls."""
    tps = [subject.tokens / s for s in seconds]
    steps = [s for _, step_times in subject.outs for s in step_times]
    itl = bm.spread(steps) if steps else None
    median_tps = subject.tokens / statistics.median(seconds)
    ceiling = bm.roofline_tokens_per_s(bench.bandwidth, bench.config, batch, case.variant)
    extra.update(tokens_per_s_min=round(min(tps), 1), tokens_per_s_max=round(max(tps), 1),
                 itl_p50_ms=None if itl is None else round(1000 * itl["median"], 3),
                 itl_p95_ms=None if itl is None else round(1000 * itl["p95"], 3))
    return dict(batch=batch, new_tokens=new_tokens, tokens_per_s=median_tps,
                ttft_ms=1000 * statistics.median(g.stats.time_to_first_token for g, _ in subject.outs),
                roofline_pct=bm.roofline_pct(median_tps, ceiling), rounds=len(seconds))


@pytest.mark.parametrize("batch,new_tokens", [(1, 200), (1, 124), (8, 124), (32, 124)],
                         ids=["b1-200tok", "b1-124tok", "b8-124tok", "b32-124tok"])
def test_decode(benchmark, bench, case, batch, new_tokens):
    """A 4-token prompt, then ``new_tokens`` greedy tokens per row. 200 crosses the 128-token
    window, so the overflow re-prefill is part of the figure; 124 stays inside it. Batch 1 /
    124 is paired with naive; a larger batch with batch 1 of the same backend."""
    if bench.quick and (batch, new_tokens) != (1, 124):
        pytest.skip("--bench-quick measures batch 1 / 124 tokens against naive only")
    if case.backend_name == "naive" and batch > 1 and not bench.full and bench.device.type == "cpu":
        pytest.skip("naive at batch > 1 recomputes every window per token (minutes): --bench-full")
    if case.backend_name == "executorch" and batch > 1 and not bench.full:
        pytest.skip("executorch's program takes one row (a phone's one sequence): a batch is a "
                    "loop of batch 1; --bench-full")
    subject = Generations(case.backend, [PROMPT] * batch, new_tokens)
    base, kind = None, None
    if batch > 1:
        base, kind = ("batch 1", Generations(case.backend, [PROMPT], new_tokens)), "batch"
    elif new_tokens == 124 and case.backend_name != "naive":
        base, kind = ("naive", Generations(bench.shared("naive"), [PROMPT], new_tokens)), "vs naive"
    timed, first, compile_s, first_s, peak = measure(benchmark, bench, case, subject, base)
    extra = {"first_call_s": first_s, **check_first_call(bench, case, subject.prompts, first.tokens)}
    seconds = timed.seconds["subject"]
    if base:
        sub = candidate(case.backend_name, case.variant, batch, new_tokens, seconds)
        other = candidate(base[1].backend.name, case.variant if kind == "batch" else "fp32", 1,
                          new_tokens, timed.seconds[base[0]])
        bench.comparisons.append(bm.Comparison(kind, "subject", base[0],
                                               {"subject": sub, base[0]: other}))
    record(benchmark, bench, case, peak_mem_mb=peak, compile_s=compile_s, extra=extra,
           **throughput(bench, case, subject, seconds, batch, new_tokens, extra))


def _drafter(bench, case, drafter: str):
    """A factory of fresh drafters, as generate.py's --speculative flags build them."""
    if drafter == "draft":  # --draft-backend ort --draft-variant --draft-vocab
        vocab = None if bench.draft_vocab is None else frequent_tokens(bench.draft_vocab)
        draft = load_draft("ort", bench.draft_dir, case.backend, bench.draft_variant, vocab)
        return lambda: ModelDrafter(draft), {"draft_variant": bench.draft_variant,
                                             "draft_vocab": None if vocab is None else len(vocab)}
    table = NgramTable.from_data(bench.ngram_data) if drafter == "ngram+data" else None
    return lambda: NgramDrafter(table=table), {}


@pytest.mark.parametrize("drafter", ["ngram", "ngram+data", "draft"])
def test_speculative(benchmark, bench, case, drafter):
    """Batch 1, 200 greedy tokens with speculation, paired with plain greedy: tokens/s,
    acceptance and mean tokens per verify step; the tokens must be the plain greedy ones."""
    if bench.quick:
        pytest.skip("--bench-quick leaves speculative decoding out")
    if case.backend_name == "naive":
        pytest.skip("naive recomputes the window: speculation only multiplies its work")
    if drafter == "draft" and bench.draft_dir is None:
        pytest.skip("no draft model: --bench-draft DIR, or the default 30m run (tiny drafts)")
    if drafter == "ngram+data" and bench.ngram_data is None:
        pytest.skip("no data folder: --bench-ngram-data DIR, or the bench's own model")
    make, about = _drafter(bench, case, drafter)
    subject = Generations(case.backend, [PROMPT], 200, make, DRAFT_TOKENS[drafter])
    plain = Generations(case.backend, [PROMPT], 200)
    timed, first, compile_s, first_s, peak = measure(benchmark, bench, case, subject, ("plain", plain))
    s = first.stats
    extra = {"first_call_s": first_s, **about, "drafter": drafter, "draft_tokens": DRAFT_TOKENS[drafter],
             "acceptance": round(s.acceptance or 0, 3),
             "tokens_per_verify_step": round(s.new_tokens / max(1, s.verify_steps), 2),
             **check_first_call(bench, case, [PROMPT], first.tokens)}
    seconds = timed.seconds["subject"]
    bench.comparisons.append(bm.Comparison("speculative", "subject", "plain", {
        "subject": candidate(case.backend_name, case.variant, 1, 200, seconds, drafter=drafter),
        "plain": candidate(case.backend_name, case.variant, 1, 200, timed.seconds["plain"])}))
    record(benchmark, bench, case, peak_mem_mb=peak, compile_s=compile_s, extra=extra,
           scenario="speculative", **throughput(bench, case, subject, seconds, 1, 200, extra))


@pytest.mark.parametrize("prompt_tokens", [4, 128], ids=["prompt4", "prompt128"])
def test_time_to_first_token(benchmark, bench, case, prompt_tokens):
    """One prefill of ``prompt_tokens`` plus the first greedy sample, read back to the host."""
    if bench.quick and prompt_tokens != 128:
        pytest.skip("--bench-quick measures the 128-token prefill only")
    gen = torch.Generator().manual_seed(prompt_tokens)
    ids = torch.randint(0, bench.config.vocab_size, (1, prompt_tokens), generator=gen).to(case.backend.device)

    @torch.inference_mode()
    def call():
        logits, _ = case.backend.prefill(ids, None)
        return logits.argmax(-1).tolist()

    bench.mem.reset()
    timed = bm.interleaved({"prefill": call}, bench.rounds, sync=lambda: bm.sync(bench.device),
                           benchmark=benchmark, primary="prefill")
    seconds = statistics.median(timed.seconds["prefill"])
    record(benchmark, bench, case, batch=1, new_tokens=1, tokens_per_s=prompt_tokens / seconds,
           ttft_ms=1000 * seconds,
           peak_mem_mb=None if bench.device.type == "cuda" else bench.mem.peak_mb(case.baseline_mb),
           roofline_pct=None, scenario="prefill", prompt_tokens=prompt_tokens,
           rounds=len(timed.seconds["prefill"]))
