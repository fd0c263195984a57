"""Candidate speed-ups for backends, measured beside the real ones (``--bench-experiments``).

Each experiment builds a backend the way the runtime does, changes one thing from the
outside, and runs the same decode scenario as ``test_backends.test_decode`` (batch 1, a
4-token prompt, 200 new tokens). The rows carry the experiment's name as their variant, so
the table shows each one next to the backend it would change. Nothing here is used by the
product; a change worth keeping belongs in the backend's own file.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import numpy as np
import pytest
import torch

from slm_export import benchmark as bm
from slm_export.artifacts import kv_layout
from slm_export.runtime import GREEDY, generate
from slm_export.runtime.base import State

PROMPT = [7454, 2402, 257, 640]  # "Once upon a time"
NEW_TOKENS = 200


class Unoptimized:
    """Runs a backend's calls with TorchScript's profiling / re-specialising executor off."""

    def __init__(self, backend):
        self.inner, self.name = backend, backend.name
        self.config, self.device = backend.config, backend.device

    def prefill(self, ids, attention_mask=None):
        with torch.jit.optimized_execution(False):
            return self.inner.prefill(ids, attention_mask)

    def decode(self, tokens, state: State):
        with torch.jit.optimized_execution(False):
            return self.inner.decode(tokens, state)


@pytest.fixture(autouse=True)
def _enabled(request):
    if not request.config.getoption("--bench-experiments"):
        pytest.skip("experiments run with --bench-experiments")


def _torchscript_no_profiling(bench):
    from slm_export.runtime import load_backend

    return "torchscript", Unoptimized(load_backend("torchscript", bench.model_dir, bench.device)), \
        contextlib.nullcontext()


class SessionRunOrt:
    """The ort backend without IO binding: numpy feeds by name through ``session.run`` (ORT
    copies every output, the whole cache included, into new arrays): the baseline the IO
    binding on every device is measured against."""

    name = "ort"

    def __init__(self, backend):
        self.inner, self.config, self.device = backend, backend.config, backend.device

    def _run(self, ids, past, mask, pos, keep=1):
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.contiguous().numpy(),
                 "position_ids": pos.contiguous().numpy(), "logits_to_keep": np.array(keep),
                 **{name: t.numpy() for name, t in
                    zip(kv_layout.past_names(self.config.n_layer), past, strict=True)}}
        logits, *present = self.inner.session.run(None, feeds)
        return torch.from_numpy(logits).float(), tuple(torch.from_numpy(t) for t in present)

    def prefill(self, ids, attention_mask=None):
        self.inner._run = self._run
        return self.inner.prefill(ids, attention_mask)

    def decode(self, tokens, state):
        return self.inner.decode(tokens, state)


def _ort_session_run(bench):
    from slm_export.runtime import load_backend

    backend = load_backend("ort", bench.model_dir, bench.device, threads=bench.threads)
    return "ort", SessionRunOrt(backend), contextlib.nullcontext()


EXPERIMENTS = {"jit-optimize-off": _torchscript_no_profiling, "ort-session-run": _ort_session_run}


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_experiment_decode(benchmark, bench, experiment):
    bench.mem.reset()
    baseline = bench.mem.rss_mb()
    backend_name, backend, ctx = EXPERIMENTS[experiment](bench)
    ttfts: list[float] = []

    def call():
        gen = generate(backend, [PROMPT], max_new_tokens=NEW_TOKENS, sampling=GREEDY, stop_id=None)
        ttfts.append(gen.stats.time_to_first_token)

    with ctx:
        warm = []
        warmups = 2 if backend_name == "compiled" else 1
        for _ in range(warmups):
            start = time.perf_counter()
            call()
            warm.append(time.perf_counter() - start)
        times: list[float] = []

        def timed():
            start = time.perf_counter()
            call()
            bm.sync(bench.device)
            times.append(time.perf_counter() - start)

        benchmark.pedantic(timed, rounds=bench.min_rounds, iterations=1, warmup_rounds=0)
    median = statistics.median(times)
    tps = NEW_TOKENS / median
    ceiling = bm.roofline_tokens_per_s(bench.bandwidth, bench.config)
    row = bm.Result(backend=backend_name, variant=experiment, device=bench.device.type,
                    preset=bench.preset, batch=1, new_tokens=NEW_TOKENS, tokens_per_s=tps,
                    ttft_ms=1000 * statistics.median(ttfts[warmups:]),
                    peak_mem_mb=bench.mem.peak_mb(baseline) if baseline is not None else None,
                    roofline_pct=bm.roofline_pct(tps, ceiling),
                    compile_s=max(0.0, sum(warm) - warmups * median) if backend_name == "compiled" else None,
                    rounds=len(times), extra={"experiment": True, "threads": bench.threads})
    bench.results.append(row)
    benchmark.extra_info.update(row.to_json())
