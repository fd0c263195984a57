"""Other CPU engines on our own weights (``--bench-engines``): CTranslate2 (float32 and int8)
and llama.cpp (f32 and q8_0), each converted from the export's ``hf/`` folder with its own
converter, timed on the scenario
``test_backends.test_decode[b1-124tok]`` times (a 4-token prompt, 124 greedy tokens: the
128 positions GPT-2's converters allow), beside our rows in the same run and table.
A 32-bit engine's tokens must equal eager's. Its rounds are interleaved with our ort
backend's at the same precision (fp32, or int8 against an 8-bit engine) by
``benchmark.interleaved``: the comparison's gain is ort's speed over the engine's.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from slm_export import benchmark as bm
from slm_export.runtime import GREEDY, generate

PROMPT = [7454, 2402, 257, 640]  # "Once upon a time"
NEW_TOKENS = 124


@pytest.fixture(autouse=True)
def _enabled(request):
    if not request.config.getoption("--bench-engines"):
        pytest.skip("other engines run with --bench-engines")


@pytest.mark.parametrize("compute_type", ["float32", "int8"])
def test_ctranslate2(benchmark, bench, compute_type):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="pip install ctranslate2 (the test extra)")
    hf = _hf_folder(bench)
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

    _time_engine(benchmark, bench, call, "ctranslate2", compute_type, 8 if compute_type == "int8" else 32,
                 f"ctranslate2 {ctranslate2.__version__}")


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpp(benchmark, bench, request, outtype):
    """llama.cpp through llama-cpp-python's own loop (``Llama.generate``, greedy), on GGUF
    files that llama.cpp's ``convert_hf_to_gguf.py`` writes from hf/ (``--bench-llama-cpp``
    names the llama.cpp source tree that holds it)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python "
                                    "(it compiles llama.cpp: ~8 minutes on 2 cores)")
    gguf = bench.model_dir / "llama.cpp" / f"model.{outtype}.gguf"
    if not gguf.is_file():
        source = request.config.getoption("--bench-llama-cpp")
        if source is None:
            pytest.skip("--bench-llama-cpp DIR: a llama.cpp source tree (its "
                        "convert_hf_to_gguf.py converts hf/ to GGUF)")
        gguf.parent.mkdir(exist_ok=True)
        partial = gguf.with_suffix(".partial")
        subprocess.run([sys.executable, str(Path(source) / "convert_hf_to_gguf.py"),
                        str(_hf_folder(bench)), "--outfile", str(partial), "--outtype", outtype],
                       check=True, capture_output=True)
        partial.replace(gguf)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=bench.config.block_size,
                          n_threads=bench.threads, n_threads_batch=bench.threads, verbose=False)

    def call():
        tokens = []
        for token in llm.generate(PROMPT, temp=0.0, top_k=1, reset=True):  # never stops itself
            tokens.append(token)
            if len(tokens) == NEW_TOKENS:
                return tokens

    _time_engine(benchmark, bench, call, "llama.cpp", outtype, 8 if outtype == "q8_0" else 32,
                 f"llama-cpp-python {llama_cpp.__version__}")


def _hf_folder(bench) -> Path:
    hf = bench.model_dir / "export" / "hf"
    if not hf.is_dir():
        pytest.skip(f"{hf} is missing: the bench exports hf/ when transformers is installed")
    return hf


def _time_engine(benchmark, bench, call, engine: str, variant: str, bits: int, version: str):
    """Time ``call`` (-> its NEW_TOKENS greedy tokens) in interleaved rounds beside our ort
    backend on the CPU at ``bits`` (fp32, or int8 against an 8-bit engine), and add the row
    and the comparison (ort's gain over the engine). A 32-bit engine's tokens must equal
    eager's; an 8-bit one's agreement with them is reported."""
    want = bench.reference([PROMPT], NEW_TOKENS)[0]
    ours_variant = "int8" if bits == 8 else "fp32"
    ours = bench.shared("ort", ours_variant, "cpu")  # on the CPU, as the engines run

    def ort_call():
        return generate(ours, [PROMPT], max_new_tokens=NEW_TOKENS, sampling=GREEDY, stop_id=None)

    timed = bm.interleaved({"engine": call, "ort": ort_call}, bench.rounds, benchmark=benchmark,
                           primary="engine")
    first = timed.first["engine"]
    if bits == 32:
        assert first == want, f"{engine} {variant} gives other greedy tokens than eager"
    seconds = timed.seconds["engine"]
    tps = [NEW_TOKENS / t for t in seconds]
    median = NEW_TOKENS / statistics.median(seconds)
    ceiling = bm.roofline_tokens_per_s(bench.bandwidth, bench.config, 1, ours_variant)
    same = sum(a == b for a, b in zip(first, want, strict=False)) / len(want)
    row = bm.Result(backend=engine, variant=variant, device="cpu", preset=bench.preset,
                    batch=1, new_tokens=NEW_TOKENS, tokens_per_s=median, ttft_ms=None,
                    peak_mem_mb=None, roofline_pct=bm.roofline_pct(median, ceiling),
                    rounds=len(seconds),
                    extra={"tokens_per_s_min": round(min(tps), 1), "tokens_per_s_max": round(max(tps), 1),
                           "parity": f"{same:.0%} of eager's greedy tokens", "threads": bench.threads,
                           "engine": version})
    bench.results.append(row)
    benchmark.extra_info.update(row.to_json())
    bench.comparisons.append(bm.Comparison("engine", "ort", "engine", {
        "ort": {"backend": "ort", "variant": ours_variant, "batch": 1, "new_tokens": NEW_TOKENS,
                "tokens": NEW_TOKENS, "seconds": timed.seconds["ort"]},
        "engine": {"backend": engine, "variant": variant, "batch": 1, "new_tokens": NEW_TOKENS,
                   "tokens": NEW_TOKENS, "seconds": seconds}}))


def _ct2_pieces(hf) -> dict[int, str]:
    """Token id -> the vocabulary piece CTranslate2 takes (the hf/ tokenizer's vocab.json)."""
    import json

    return {i: piece for piece, i in json.loads((hf / "vocab.json").read_text()).items()}
