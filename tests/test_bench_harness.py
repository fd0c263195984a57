"""The benchmark suite's pure helpers: roofline math, memory probe, results.json schema, table."""

from __future__ import annotations

import json

import pytest

from slm_export import benchmark as bm
from slm_export.config import PRESETS, GPTConfig
from slm_export.model import GPT


@pytest.mark.parametrize("preset", ["tiny", "30m"])
def test_decode_weights_are_all_params_but_the_position_table(preset):
    """Matrices + vectors read per step == every parameter except wpe (wte is tied to lm_head)."""
    config = PRESETS[preset]
    matrices, vectors = bm.decode_weight_params(config)
    if preset == "tiny":
        model = GPT(config)
        assert matrices + vectors == model.num_params() - model.transformer.wpe.weight.numel()
    else:  # 30m: the counts for the reference architecture, without building it
        assert matrices == 6 * 12 * 384 * 384 + 50257 * 384 == 29_915_520
        assert vectors == 6 * (4 * 384 + 9 * 384) + 2 * 384 == 30_720


def test_no_bias_config_counts_layernorm_weights_only():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=10, bias=False)
    model = GPT(config)
    matrices, vectors = bm.decode_weight_params(config)
    assert matrices + vectors == model.num_params() - model.transformer.wpe.weight.numel()
    assert vectors == 2 * 2 * 8 + 8


def test_roofline_ceiling_scales_with_batch_and_weight_dtype():
    config = PRESETS["30m"]
    fp32 = bm.bytes_per_decode_step(config)
    assert fp32 == 29_915_520 * 4 + 30_720 * 4
    int8 = bm.bytes_per_decode_step(config, "int8")
    assert int8 == 29_915_520 + 30_720 * 4
    bw = 40e9
    one = bm.roofline_tokens_per_s(bw, config)
    assert one == pytest.approx(bw / fp32)
    assert 330 < one < 340  # ~120 MB per token at 40 GB/s
    assert bm.roofline_tokens_per_s(bw, config, batch=8) == pytest.approx(8 * one)
    assert bm.roofline_tokens_per_s(bw, config, weight_dtype="int8") > 3.9 * one
    assert bm.roofline_pct(one / 2, one) == pytest.approx(50.0)


def test_read_bandwidth_is_measured_and_plausible():
    bw = bm.measure_read_bandwidth("cpu", threads=1, megabytes=8, repeats=2)
    assert 1e8 < bw < 1e13  # 0.1 GB/s .. 10 TB/s


def test_rss_peak_sees_an_allocation_above_the_baseline():
    mem = bm.RssPeak()
    if not mem.available:
        pytest.skip("no /proc/self/status VmHWM or clear_refs on this OS")
    mem.reset()
    base = mem.rss_mb()
    block = bytearray(64 * 2**20)
    block[:: 4096] = b"\x01" * len(block[:: 4096])  # touch every page
    peak = mem.peak_mb(base)
    del block
    assert peak is not None and peak >= 60


def _row(backend, tps, **kw):
    fields = dict(variant="fp32", device="cpu", preset="tiny", batch=1, new_tokens=200,
                  ttft_ms=1.5, peak_mem_mb=12.0, roofline_pct=40.0)
    fields.update(kw)
    return bm.Result(backend=backend, tokens_per_s=tps, **fields)


def test_results_json_has_the_names_other_tools_read(tmp_path):
    rows = [_row("naive", 40.0), _row("eager", 100.0, compile_s=None),
            _row("compiled", 130.0, compile_s=12.5),
            _row("eager", 30.0, scenario="prefill", prompt_tokens=128, new_tokens=1)]
    machine = bm.machine_info(threads=2)
    path = bm.write_results(tmp_path / "sub" / "results.json", machine, rows)
    doc = json.loads(path.read_text())
    bm.check_results(doc)
    assert set(doc) == {"machine", "results"}
    assert {"cpu", "cores", "threads", "gpu", "torch", "onnxruntime", "onnx", "python"} <= set(
        doc["machine"])
    first = doc["results"][0]
    assert set(bm.RESULT_FIELDS) <= set(first)
    assert "compile_s" not in first  # optional: only where something was compiled
    assert doc["results"][2]["compile_s"] == 12.5
    assert doc["results"][1]["speedup_vs_naive"] == pytest.approx(2.5)
    assert doc["results"][3]["speedup_vs_naive"] is None  # no naive prefill row to compare with


def test_check_results_names_the_missing_field():
    doc = {"machine": bm.machine_info(threads=1), "results": [{"backend": "eager"}]}
    with pytest.raises(ValueError, match="tokens_per_s"):
        bm.check_results(doc)


def test_table_renders_every_row():
    from rich.console import Console

    rows = [_row("naive", 40.0), _row("ort", 250.0, variant="int8", roofline_pct=None)]
    console = Console(width=200, record=True)
    console.print(bm.results_table(rows))
    text = console.export_text()
    assert "naive" in text and "int8" in text and "6.25x" in text


def test_summary_puts_each_backend_on_one_row(tmp_path):
    rows = [_row("ort", 100.0, new_tokens=124, extra={"file_mb": 9.5, "load_s": 0.25}),
            _row("ort", 400.0, batch=8, new_tokens=124),
            _row("ort", 90.0),  # the plain batch-1 / 200-token row speculation is compared with
            _row("ort", 180.0, scenario="speculative", extra={"drafter": "ngram"}),
            _row("ort", 270.0, scenario="speculative", extra={"drafter": "ngram+data"}),
            # paired rounds: the gain measured beside its own plain runs wins over the rows'
            _row("ort", 150.0, scenario="speculative", extra={"drafter": "draft",
                                                              "paired_speedup": 1.5}),
            _row("eager", 50.0, new_tokens=124, peak_mem_mb=99.0)]
    doc = json.loads(bm.write_results(tmp_path / "r.json", bm.machine_info(1), rows).read_text())
    table = bm.summary_table(doc).splitlines()
    assert len(table) == 2 + 2
    ort = next(line for line in table if line.startswith("| ort "))
    assert [c.strip() for c in ort.split("|")[1:-1]] == [
        "ort", "fp32", "9.5", "0.25", "100.0", "400.0", "-", "4.00x", "180.0 (2.00x)",
        "270.0 (3.00x)", "150.0 (1.50x)", "-", "12"]


@pytest.mark.parametrize("page", ["bench/RESULTS.md", "README.md"])
def test_published_tables_are_regenerated_from_committed_results(page):
    """Every table between <!-- results|summary|targets: FILE --> and <!-- end --> is what
    `python -m slm_export.benchmark --update PAGE` makes of a committed results file: no
    published number without its source."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / page).read_text()
    sources = {m.group(3) for m in bm.BLOCK.finditer(text)}
    assert sources and all(s.startswith("bench/results/") for s in sources), sources
    assert bm.regenerate(text, root) == text


def test_targets_say_met_or_not_from_the_rows(tmp_path):
    rows = [_row("ort", 300.0, new_tokens=124, roofline_pct=95.0),
            _row("ort", 1200.0, batch=8, new_tokens=124),
            _row("naive", 100.0, new_tokens=124),
            _row("eager", 200.0, new_tokens=124),
            _row("ort", 280.0, roofline_pct=89.0),
            _row("ort", 560.0, scenario="speculative", roofline_pct=180.0, extra={"drafter": "ngram"}),
            _row("ort", 340.0, scenario="speculative", roofline_pct=110.0,
                 extra={"drafter": "draft", "paired_speedup": 1.45}),
            _row("ort", 500.0, variant="int4", new_tokens=124,
                 extra={"parity": "top-1 agreement 0.912"}),
            _row("llama.cpp", 250.0, variant="f32", new_tokens=124),
            _row("llama.cpp", 900.0, variant="f32", batch=8, new_tokens=124),
            _row("aoti", 350.0, new_tokens=124),
            _row("aoti", 999.0, variant="fp16", new_tokens=124),
            _row("ctranslate2", 999.0, variant="fp32", new_tokens=124),  # an engine, not ours
            # its rounds each beside one of ort int8's: the paired ratio, no ort int8 row needed
            _row("ctranslate2", 600.0, variant="int8", new_tokens=124,
                 extra={"ort_paired_variant": "int8", "ort_paired_ratio": 0.97})]
    doc = json.loads(bm.write_results(tmp_path / "r.json", bm.machine_info(1), rows).read_text())
    got = {cells[0]: cells[1:] for line in bm.targets_table(doc).splitlines()[2:]
           for cells in [[c.strip() for c in line.split("|")[1:-1]]]}
    assert got["ort fp32, batch 1: >= 90% of the fp32 roofline"] == ["95%", "yes"]
    assert got["eager, batch 1: >= 2.5x naive"] == ["2.00x", "no"]
    assert got["torchscript, batch 1: >= 2.5x naive"] == ["not measured", "-"]
    assert got["ort fp32: batch 8 >= 4.0x its batch-1 tokens/s"] == ["4.00x", "yes"]
    assert got["ort int4: top-1 agreement with fp32 >= 0.95"] == ["0.912", "no"]
    assert got["ort + ngram speculation: >= 1.5x its plain greedy"] == [
        "2.00x (560 tok/s, 180% of the roofline)", "yes"]
    assert got["ort + draft speculation: >= 1.5x its plain greedy"] == [  # 340 / 280 unpaired
        "1.45x (340 tok/s, 110% of the roofline)", "no"]
    assert got["ort fp32, batch 1: >= 1x llama.cpp f32 (same run)"] == ["1.20x", "yes"]
    assert got["ort int8, batch 1: >= 1x CTranslate2 int8 (same run)"] == ["0.97x", "no"]
    assert got["ort int8, batch 1: >= 1x llama.cpp q8_0 (same run)"] == ["not measured", "-"]
    # our fastest fp32 batch-1 row, whichever backend: not another engine, variant or batch
    assert got["fastest of ours at fp32, batch 1 (aoti): >= 1x llama.cpp f32 (same run)"] == [
        "1.40x", "yes"]


def test_ort_against_an_engine_takes_the_paired_rounds(tmp_path):
    """An engine row timed round by round beside ort (bench/test_engines.py) carries ort's
    paired ratio: it wins over the two rows' medians. The fastest-of-ours target picks its
    backend by the rows' medians and compares rows, whichever backend wins."""
    rows = [_row("ort", 180.0, new_tokens=124),  # a slow row: 0.75x from the medians
            _row("eager", 100.0, new_tokens=124),
            _row("llama.cpp", 240.0, variant="f32", new_tokens=124,
                 extra={"ort_paired_variant": "fp32", "ort_paired_ratio": 1.04}),
            _row("llama.cpp", 500.0, variant="q8_0", new_tokens=124,  # paired with another
                 extra={"ort_paired_variant": "fp32", "ort_paired_ratio": 2.0})]
    doc = json.loads(bm.write_results(tmp_path / "r.json", bm.machine_info(1), rows).read_text())
    got = {cells[0]: cells[1:] for line in bm.targets_table(doc).splitlines()[2:]
           for cells in [[c.strip() for c in line.split("|")[1:-1]]]}
    assert got["ort fp32, batch 1: >= 1x llama.cpp f32 (same run)"] == ["1.04x", "yes"]
    assert got["fastest of ours at fp32, batch 1 (ort): >= 1x llama.cpp f32 (same run)"] == [
        "0.75x", "no"]
    assert got["ort int8, batch 1: >= 1x llama.cpp q8_0 (same run)"] == ["not measured", "-"]


def test_a_batched_row_takes_its_paired_gain_over_batch_1(tmp_path):
    """A batch-8 row whose rounds each followed a batch-1 generation (bench/test_backends.py)
    carries that gain: it wins over the two rows' medians, in the summary and the targets."""
    rows = [_row("ort", 100.0, new_tokens=124),
            _row("ort", 500.0, batch=8, new_tokens=124, extra={"paired_vs_batch1": 3.5}),
            _row("compiled", 100.0, new_tokens=124),
            _row("compiled", 350.0, batch=8, new_tokens=124)]  # an older file: no pairs
    doc = json.loads(bm.write_results(tmp_path / "r.json", bm.machine_info(1), rows).read_text())
    got = {cells[0]: cells[1:] for line in bm.targets_table(doc).splitlines()[2:]
           for cells in [[c.strip() for c in line.split("|")[1:-1]]]}
    assert got["ort fp32: batch 8 >= 4.0x its batch-1 tokens/s"] == ["3.50x", "no"]
    assert got["compiled fp32: batch 8 >= 3.0x its batch-1 tokens/s"] == ["3.50x", "yes"]
    summary = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
               for line in bm.summary_table(doc).splitlines()[2:]}
    assert summary["ort"][7] == "3.50x" and summary["compiled"][7] == "3.50x"
