"""The lm_head matmul alone, per weight layout and row count (bench/RESULTS.md).

    python bench/lm_head_layouts.py --threads 2

The tied (vocab, n_embd) matrix of the 30m model times 1-8 rows, as a decode step (1 row per
sequence) or a speculative verify step (the pending token and its drafts) computes it:
- ``row-major``: the checkpoint's layout, ``F.linear`` (naive, compiled and training use it);
- ``column-major``: the same values stored transposed, ``F.linear``;
- ``blocked``: ``model.BlockedHead`` (32 vocabulary slices, each column-major, one ``bmm``),
  what eager and the TorchScript export run;
- ``onnxruntime``: one ONNX ``MatMul`` with the matrix as an initializer (MLAS packs it at
  load), for reference.
Median milliseconds over ``--rounds`` interleaved rounds; prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.nn import functional as F

from slm_export.model import BlockedHead

ROWS = (1, 2, 4, 6, 8)


def _ort_matmul(weight: torch.Tensor, threads: int):
    w = numpy_helper.from_array(weight.t().contiguous().numpy(), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "lm_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", weight.size(1)])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", weight.size(0)])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # Its pool would keep spinning on the cores after each call, slowing the next layout's.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x.numpy()})


def _ms(fn, x, calls: int) -> float:
    fn(x)
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=10, help="timed calls per round")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--n-embd", type=int, default=384)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(args.vocab, args.n_embd) * 0.02
    column = weight.t().contiguous().t()
    blocked = BlockedHead(weight)
    layouts = {
        "row-major": lambda x: F.linear(x, weight),
        "column-major": lambda x: F.linear(x, column),
        "blocked": blocked,
        "onnxruntime": _ort_matmul(weight, args.threads),
    }
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for rows in ROWS:
                x = torch.randn(rows, args.n_embd)
                for name, fn in layouts.items():
                    times.setdefault((name, rows), []).append(_ms(fn, x, args.calls))
        x = torch.randn(3, args.n_embd)
        np.testing.assert_allclose(blocked(x).numpy(), F.linear(x, weight).numpy(), atol=1e-5)
    print(f"lm_head ({args.vocab} x {args.n_embd}), {args.threads} threads, torch "
          f"{torch.__version__}, onnxruntime {ort.__version__}: median ms per call\n")
    print("| layout | " + " | ".join(f"{r} row{'s' * (r > 1)}" for r in ROWS) + " |")
    print("|---|" + "---|" * len(ROWS))
    for name in layouts:
        cells = (f"{statistics.median(times[(name, r)]):.2f}" for r in ROWS)
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
