"""Where a decode step of the ort backend spends its time, per batch size (bench/RESULTS.md).

    python bench/profile_decode.py artifacts/bench/model-30m-300steps --batch 1 8 32

Greedy generation through the one loop users run (a 4-token prompt, ``--tokens`` new tokens
per row), with ONNX Runtime's profiler on: each graph node's time is summed by operator type
over the decode steps (the prefill is left out), and the step's wall time is split into
ORT's own run (nodes, plus its scheduling between them), the sampling call, and the rest
(our Python: the loop, IO binding, new output tensors). Prints a markdown table per batch size.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort
import torch

from slm_export.runtime import GREEDY, generate, generation, load_backend

PROMPT = [7454, 2402, 257, 640]  # "Once upon a time"


def _profiling_session(path: Path, threads: int, prefix: str) -> ort.InferenceSession:
    """The backend's session options (``artifacts.loaders.ort_session``) with profiling on."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling, options.profile_file_prefix = True, prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def profile(model: Path, variant: str, batch: int, tokens: int, threads: int) -> dict:
    backend = load_backend("ort", model, "cpu", variant=variant, threads=threads)
    # The same file and options, profiled (a measurement script may swap a backend's session).
    backend.session = _profiling_session(backend.path, threads, f"/tmp/slm-profile-b{batch}")
    backend._binding = backend.session.io_binding()
    kw = dict(max_new_tokens=tokens, sampling=GREEDY, stop_id=None)
    generate(backend, [PROMPT] * batch, **kw)  # warm-up, then the measured run
    runs, samples = [], []
    real_run, real_sample = backend.session.run_with_iobinding, generation.sample

    def timed_run(binding, *a):
        start = time.perf_counter()
        real_run(binding, *a)
        runs.append(time.perf_counter() - start)

    def timed_sample(*a, **k):
        start = time.perf_counter()
        out = real_sample(*a, **k)
        samples.append(time.perf_counter() - start)
        return out

    backend.session.run_with_iobinding = timed_run
    generation.sample = timed_sample
    try:
        start = time.perf_counter()
        out = generate(backend, [PROMPT] * batch, **kw)
        wall = time.perf_counter() - start
    finally:
        generation.sample = real_sample
    trace_path = Path(backend.session.end_profiling())
    trace = json.loads(trace_path.read_text())
    trace_path.unlink()
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace
                        if e.get("name") == "model_run")
    measured = model_runs[-len(runs):]  # the measured generation's runs
    decode_runs = measured[1:]  # leave out its prefill
    by_op: dict[str, float] = defaultdict(float)
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            if any(lo <= e["ts"] <= hi for lo, hi in decode_runs):
                by_op[e["args"]["op_name"]] += e["dur"] / 1e6
    steps = len(decode_runs)
    assert out.stats.prefills == 1, "keep --tokens inside the window: one prefill"
    return {"batch": batch, "steps": steps, "wall_ms": 1000 * (wall - runs[0]) / steps,
            "ort_ms": 1000 * sum(runs[1:]) / steps, "sample_ms": 1000 * sum(samples[1:]) / steps,
            "ops_ms": {op: 1000 * s / steps for op, s in sorted(by_op.items(), key=lambda kv: -kv[1])}}


def table(p: dict, top: int = 8) -> str:
    nodes = sum(p["ops_ms"].values())
    lines = [f"batch {p['batch']}: {p['wall_ms']:.2f} ms per decode step "
             f"({p['batch'] * 1000 / p['wall_ms']:.0f} tok/s over {p['steps']} steps)", "",
             "| part of the step | ms | share |", "|---|---:|---:|"]

    def row(name, ms):
        lines.append(f"| {name} | {ms:.3f} | {100 * ms / p['wall_ms']:.0f}% |")

    for op, ms in list(p["ops_ms"].items())[:top]:
        row(f"ORT node: {op}", ms)
    row("ORT nodes: the other operator types", sum(list(p["ops_ms"].values())[top:]))
    row("ORT run outside its nodes (scheduling, allocation)", p["ort_ms"] - nodes)
    row("sampling (greedy argmax)", p["sample_ms"])
    row("the loop in Python (binding, new tensors, bookkeeping)",
        p["wall_ms"] - p["ort_ms"] - p["sample_ms"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a run folder or export folder")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=100, help="new tokens per row (< 124)")
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for batch in args.batch:
        print(table(profile(args.model, args.variant, batch, args.tokens, args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
