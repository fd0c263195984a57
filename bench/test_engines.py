"""Other CPU engines on our own weights (``--bench-engines``): CTranslate2 (float32 and int8)
converted from the export's ``hf/`` folder with its own converter, timed on the scenario
``test_backends.test_decode[b1-124tok]`` times (a 4-token prompt, 124 greedy tokens: the
128 positions GPT-2's converters allow), beside our rows in the same run and table.
CTranslate2's float32 tokens must equal eager's before it is timed.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import pytest

from slm_export import benchmark as bm

PROMPT = [7454, 2402, 257, 640]  # "Once upon a time"
NEW_TOKENS = 124


@pytest.fixture(autouse=True)
def _enabled(request):
    if not request.config.getoption("--bench-engines"):
        pytest.skip("other engines run with --bench-engines")


@pytest.mark.parametrize("compute_type", ["float32", "int8"])
def test_ctranslate2(benchmark, bench, compute_type):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="pip install ctranslate2 (the test extra)")
    hf = bench.model_dir / "export" / "hf"
    if not hf.is_dir():
        pytest.skip(f"{hf} is missing: the bench exports hf/ when transformers is installed")
    out = bench.model_dir / "ctranslate2"
    if not (out / "model.bin").is_file():
        subprocess.run([sys.executable, "-m", "ctranslate2.converters.transformers", "--model",
                        str(hf), "--output_dir", str(out), "--force"], check=True,
                       capture_output=True)
    generator = ctranslate2.Generator(str(out), device="cpu", compute_type=compute_type,
                                      intra_threads=bench.threads, inter_threads=1)
    vocab = _ct2_pieces(hf)
    prompt = [vocab[t] for t in PROMPT]

    def call():
        # No end token: our rows run through <|endoftext|> too. Without the prompt in the
        # result, max_length counts new tokens only.
        result = generator.generate_batch([prompt], max_length=NEW_TOKENS, end_token=[],
                                          sampling_topk=1, include_prompt_in_result=False)
        return result[0].sequences_ids[0]

    first = call()
    want = bench.reference([PROMPT], NEW_TOKENS)[0]
    if compute_type == "float32":
        assert first == want, "CTranslate2 float32 gives other greedy tokens than eager"
    times = []

    def timed():
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(timed, rounds=bench.min_rounds, iterations=1, warmup_rounds=0)
    tps = [NEW_TOKENS / t for t in times]
    median = NEW_TOKENS / statistics.median(times)
    ceiling = bm.roofline_tokens_per_s(bench.bandwidth, bench.config, 1,
                                       "int8" if compute_type == "int8" else "fp32")
    same = sum(a == b for a, b in zip(first, want, strict=False)) / len(want)
    row = bm.Result(backend="ctranslate2", variant=compute_type, device="cpu", preset=bench.preset,
                    batch=1, new_tokens=NEW_TOKENS, tokens_per_s=median, ttft_ms=None,
                    peak_mem_mb=None, roofline_pct=bm.roofline_pct(median, ceiling),
                    rounds=len(times),
                    extra={"tokens_per_s_min": round(min(tps), 1), "tokens_per_s_max": round(max(tps), 1),
                           "parity": f"{same:.0%} of eager's greedy tokens", "threads": bench.threads,
                           "engine": f"ctranslate2 {ctranslate2.__version__}"})
    bench.results.append(row)
    benchmark.extra_info.update(row.to_json())


def _ct2_pieces(hf) -> dict[int, str]:
    """Token id -> the vocabulary piece CTranslate2 takes (the hf/ tokenizer's vocab.json)."""
    import json

    return {i: piece for piece, i in json.loads((hf / "vocab.json").read_text()).items()}
