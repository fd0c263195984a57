"""slm-serve under load: C concurrent streaming clients (C = 1, 4, 16) on a free loopback
port, each asking for 128 greedy tokens of a stories prompt, a bounded number of requests.

Per backend and C: aggregate tokens/s (every client's tokens over the run's wall time), time
to first token and inter-token latency p50 / p95 (per request, from the client's side of the
stream) and failed requests, which must be 0. C = 1, 4 and 16 are timed in interleaved
rounds (``benchmark.interleaved``): their throughput ratio is a paired comparison. With
``--bench-engines`` and llama-cpp-python's server installed, llama.cpp's own server runs the
same load on the GGUF of the same weights.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from slm_export import benchmark as bm

httpx = pytest.importorskip("httpx", reason="the serving bench needs httpx (the bench extra)")

CLIENTS = (1, 4, 16)
NEW_TOKENS = 128
REQUESTS_PER_CLIENT = 2
PROMPTS = ["Once upon a time", "One day, a little girl named", "The dog saw a big red ball and",
           "Tom and Sue went to the park. They", "There was a tiny frog who", "Mom said to Tim,",
           "In the forest there was a bear who", "Lily wanted to play with her friend"]
SERVE_CASES = [("ort", "fp32"), ("ort", "int8"), ("aoti", "fp32"), ("eager", "fp32"), ("compiled", "fp32")]


class Load:
    """One load run: C client threads, each sending its requests one after another and
    reading the stream; keeps the last run's per-request first-token times and inter-chunk
    gaps (every run's tokens are the same: greedy, the same prompts)."""

    def __init__(self, url: str, clients: int, model: str | None = None, usage: bool = True):
        self.url, self.clients, self.model, self.usage = url, clients, model, usage
        self.ttft, self.itl, self.tokens, self.failed = [], [], 0, 0
        self.failed_runs = 0  # runs with a failed request, over every call

    def __call__(self) -> None:
        """One run; the figures are the last run's."""
        self.ttft, self.itl, self.tokens, self.failed = [], [], 0, 0
        lock = threading.Lock()

        def client(c: int) -> None:
            with httpx.Client(base_url=self.url, timeout=300) as http:
                for r in range(REQUESTS_PER_CLIENT):
                    body = {"prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": NEW_TOKENS,
                            "temperature": 0, "stream": True}
                    if self.model:
                        body["model"] = self.model
                    if self.usage:  # tokens as the server counts them (a request may end early)
                        body["stream_options"] = {"include_usage": True}
                    result = self._one(http, body)
                    with lock:
                        if result is None:
                            self.failed += 1
                        else:
                            first, gaps, n = result
                            self.ttft.append(first)
                            self.itl += gaps
                            self.tokens += n

        threads = [threading.Thread(target=client, args=(c,)) for c in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        self.failed_runs += self.failed > 0

    @staticmethod
    def _one(http, body) -> tuple[float, list[float], int] | None:
        """(time to first text, gaps between text chunks, tokens) of one streamed request:
        tokens from the usage chunk where the server sends one, else the text chunks."""
        start, last, first, gaps, n, usage, done = time.perf_counter(), None, None, [], 0, None, False
        with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return None
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[len("data: "):])
                    if chunk.get("usage"):
                        usage = chunk["usage"]["completion_tokens"]
                    if any(choice.get("text") for choice in chunk.get("choices", ())):
                        now = time.perf_counter()
                        first = first if first is not None else now - start
                        if last is not None:
                            gaps.append(now - last)
                        last, n = now, n + 1
        return (first, gaps, n if usage is None else usage) if done and first is not None else None


def _row(bench, backend: str, variant: str, load: Load, seconds: list[float]) -> bm.Result:
    """The row of a load's runs: tokens/s over the median run, latencies of the last run."""
    ttft, itl = bm.spread(load.ttft or [0.0]), bm.spread(load.itl or [0.0])
    return bm.Result(
        backend=backend, variant=variant, device=bench.device.type, preset=bench.preset,
        batch=load.clients, new_tokens=NEW_TOKENS, tokens_per_s=load.tokens / statistics.median(seconds),
        ttft_ms=1000 * ttft["median"], peak_mem_mb=None, roofline_pct=None, scenario="serve",
        rounds=len(seconds), extra={"clients": load.clients, "requests": load.clients * REQUESTS_PER_CLIENT,
                         "failed": load.failed, "ttft_p95_ms": round(1000 * ttft["p95"], 2),
                         "itl_p50_ms": round(1000 * itl["median"], 3),
                         "itl_p95_ms": round(1000 * itl["p95"], 3), "threads": bench.threads,
                         "parity": f"{load.failed} failed"})


def _serve(bench, name: str, variant: str):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers.server import serving

    return serving(bench.model_dir, "--backend", name, "--variant", variant, "--max-batch",
                   str(max(CLIENTS)), "--device", bench.device.type)


@pytest.mark.parametrize("name,variant", SERVE_CASES, ids=[f"{b}-{v}" for b, v in SERVE_CASES])
def test_serving(benchmark, bench, name, variant):
    if bench.quick:
        pytest.skip("--bench-quick leaves the serving load out")
    wanted = bench.wanted
    if wanted is not None and (name, variant) not in wanted:
        pytest.skip("not among --bench-backends")
    if name == "aoti" and bench.device.type != "cpu":
        pytest.skip("aoti: the bench's package is compiled for the CPU")
    with _serve(bench, name, variant) as server:
        loads = {c: Load(server.url, c) for c in CLIENTS}
        timed = bm.interleaved({f"C={c}": loads[c] for c in (16, 1, 4)}, rounds=bench.rounds,
                               benchmark=benchmark, primary="C=16")
    for c, load in loads.items():
        assert load.failed_runs == 0, f"failed requests at C={c}"
        bench.results.append(_row(bench, name, variant, load, timed.seconds[f"C={c}"]))
    bench.comparisons.append(bm.Comparison("serve", "C=16", "C=1", {  # greedy: every run's tokens alike
        f"C={c}": {"backend": name, "variant": variant, "batch": 1, "clients": c,
                   "tokens": loads[c].tokens, "seconds": timed.seconds[f"C={c}"]} for c in (16, 1)}))


def test_llama_cpp_server(benchmark, bench):
    """llama.cpp's own server (llama-cpp-python's ``llama_cpp.server``) on the f32 GGUF of the
    same weights under the C = 16 load."""
    if not bench.engines:
        pytest.skip("other engines run with --bench-engines")
    pytest.importorskip("llama_cpp.server", reason="pip install 'llama-cpp-python[server]'")
    gguf = bench.model_dir / "llama.cpp" / "model.f32.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} is missing: bench/test_engines.py writes it (--bench-llama-cpp DIR)")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                             "--n_threads", str(bench.threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        load = Load(url, 16, model=str(gguf), usage=False)  # its one-token chunks count
        timed = bm.interleaved({"C=16": load}, rounds=bench.rounds, benchmark=benchmark, primary="C=16")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    import llama_cpp

    row = _row(bench, "llama.cpp server", "f32", load, timed.seconds["C=16"])
    row.extra["engine"] = f"llama-cpp-python {llama_cpp.__version__} (llama_cpp.server)"
    bench.results.append(row)
    assert load.failed_runs == 0, "failed requests"
