"""What a speculative verify step costs against a decode step, per backend (bench/RESULTS.md).

    python bench/verify_cost.py artifacts/bench/model-30m-300steps --backends ort ort-int8 ort-int4

A verify step scores the pending token and K drafts in one forward pass (``Backend.score``
of 1 + K tokens). Speculation pays when the tokens a step keeps outweigh what the wider pass
costs, so this times ``score`` of 1, 2, 3, 5 and 8 tokens per row at batch 1 after a 40-token
prefix (the same state each call), all widths interleaved round by round, and prints the
median milliseconds and each width's cost in decode steps as a markdown table. A decode
step is taken as ``score`` of 1 token: the same graph call for ort, torchscript and eager
(``compiled`` has a decode graph of its own, so its 1-token column is its score graph's).
CPU only, with torch's thread count (``--threads``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from slm_export.runtime import load_backend
from slm_export.runtime.base import host_threads

PREFIX = 40
WIDTHS = (1, 2, 3, 5, 8)


def _load(model: Path, name: str, threads: int):
    """"ort-int8" -> the ort backend on the int8 file; "eager", "aoti", ...: that backend."""
    backend, _, variant = name.partition("-")
    return load_backend(backend, model, "cpu", variant=variant or "fp32", threads=threads)


@torch.no_grad()
def costs(backend, rounds: int) -> dict[int, float]:
    """Median seconds of ``score`` per width (tokens per row)."""
    gen = torch.Generator().manual_seed(0)
    vocab = backend.config.vocab_size
    rows = {k: torch.randint(0, vocab, (1, k), generator=gen) for k in WIDTHS}
    times: dict[int, list[float]] = {k: [] for k in WIDTHS}
    with host_threads(backend):
        _, state = backend.prefill(torch.randint(0, vocab, (1, PREFIX), generator=gen), None)
        for k in WIDTHS:  # warm-up (a compiled backend compiles here)
            backend.score(rows[k], state)
        for _ in range(rounds):
            for k in WIDTHS:
                start = time.perf_counter()
                backend.score(rows[k], state)
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(t) for k, t in times.items()}


def table(results: dict[str, dict[int, float]]) -> str:
    head = "| backend | " + " | ".join(f"{k} token{'s' if k > 1 else ''}" for k in WIDTHS) + " |"
    lines = [head, "|---|" + "---:|" * len(WIDTHS)]
    for name, c in results.items():
        cells = [f"{1000 * c[k]:.2f} ms ({c[k] / c[1]:.2f})" for k in WIDTHS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a run folder or export folder")
    parser.add_argument("--backends", nargs="+", default=["ort", "ort-int8", "ort-int4"],
                        help="backend names, ort-<variant> for an ONNX variant")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {name: costs(_load(args.model, name, args.threads), args.rounds)
               for name in args.backends}
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
