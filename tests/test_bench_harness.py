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
    head = 50257 * 384  # mixed: the head at 8 bits (+ a scale per 128), the blocks at 4
    assert bm.bytes_per_decode_step(config, "mixed") == round(
        (29_915_520 - head) * (0.5 + 4 / 32) + head * (1 + 4 / 128)) + 30_720 * 4
    bw = 40e9
    one = bm.roofline_tokens_per_s(bw, config)
    assert one == pytest.approx(bw / fp32)
    assert 330 < one < 340  # ~120 MB per token at 40 GB/s
    assert bm.roofline_tokens_per_s(bw, config, batch=8) == pytest.approx(8 * one)
    assert bm.roofline_tokens_per_s(bw, config, variant="int8") > 3.9 * one
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


def _cand(backend, seconds, variant="fp32", batch=1, tokens=100, **more):
    return {"backend": backend, "variant": variant, "batch": batch, "new_tokens": tokens // batch,
            "tokens": tokens, "seconds": seconds, **more}


def _doc(tmp_path, rows, comparisons=()):
    return json.loads(bm.write_results(tmp_path / "r.json", bm.machine_info(1), rows,
                                       comparisons).read_text())


class FakeBenchmark:
    """pytest-benchmark's ``pedantic`` as it calls back: setup, then the timed target, per round."""

    def __init__(self):
        self.calls = []

    def pedantic(self, target, setup, rounds, iterations, warmup_rounds):
        assert (iterations, warmup_rounds) == (1, 0)
        for _ in range(rounds):
            setup()
            target()
            self.calls.append("timed")


@pytest.mark.parametrize("with_benchmark", [False, True])
def test_interleaved_rounds_warm_up_alike_and_rotate_the_order(with_benchmark):
    """Every candidate warmed up alike, then each round runs all of them in an order rotated
    by one: no candidate always follows the same one. pytest-benchmark, where given, times the
    primary's calls and the others run in its setup hook; every call's seconds are kept."""
    ran = []
    candidates = {name: (lambda n=name: ran.append(n) or n) for name in ("a", "b", "c")}
    fake = FakeBenchmark() if with_benchmark else None
    out = bm.interleaved(candidates, 4, settle_s=0, benchmark=fake, primary="b" if fake else None)
    assert ran[:3] == ["a", "b", "c"]  # the warm-up round
    assert ran[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert out.first == {"a": "a", "b": "b", "c": "c"}
    assert all(len(s) == 4 and min(s) >= 0 for s in out.seconds.values())
    if fake:
        assert fake.calls == ["timed"] * 4
    with pytest.raises(ValueError):
        bm.interleaved(candidates, 2, benchmark=FakeBenchmark(), primary="z")


def test_a_gain_is_the_median_of_the_per_round_ratios():
    # round ratios (100/1)/(100/2) = 2, (100/1)/(100/4) = 4, (100/2)/(100/2) = 1: median 2
    assert bm.gain([1, 1, 2], [2, 4, 2], 100, 100) == 2
    assert bm.gain([1.0], [1.0], 800, 100) == 8  # batch 8 against batch 1: tokens count
    comparison = {"kind": "batch", "subject": "b8", "base": "b1",
                  "candidates": {"b8": _cand("ort", [2, 2], batch=8, tokens=800),
                                 "b1": _cand("ort", [1, 0.5])}}
    assert bm.comparison_gain(comparison) == pytest.approx((4 + 2) / 2)


def test_results_file_has_the_names_other_tools_read(tmp_path):
    rows = [_row("naive", 40.0), _row("eager", 100.0, compile_s=None),
            _row("compiled", 130.0, compile_s=12.5)]
    comparisons = [bm.Comparison("vs naive", "eager", "naive", {
        "eager": _cand("eager", [1.0, 1.1]), "naive": _cand("naive", [2.5, 2.4])})]
    path = bm.write_results(tmp_path / "sub" / "results.json", bm.machine_info(threads=2), rows,
                            comparisons)
    doc = bm.load_results(path)
    assert set(doc) == {"schema", "machine", "results", "comparisons"}
    assert {"cpu", "cores", "threads", "gpu", "torch", "onnxruntime", "onnx", "python", "date",
            "commit"} <= set(doc["machine"])
    first = doc["results"][0]
    assert set(bm.RESULT_FIELDS) <= set(first) and "compile_s" not in first
    assert doc["results"][2]["compile_s"] == 12.5
    assert doc["comparisons"][0]["candidates"]["naive"]["seconds"] == [2.5, 2.4]  # raw, kept
    assert bm.find_gain(doc, "vs naive", backend="eager") == pytest.approx((2.5 + 2.4 / 1.1) / 2)
    # the commit read when the run started, not when it rewrites its (tracked) results file
    assert bm.machine_info(threads=2, commit="abc123")["commit"] == "abc123"


@pytest.mark.parametrize("damage,match", [
    (lambda d: d.pop("schema"), "schema"), (lambda d: d["machine"].pop("date"), "date"),
    (lambda d: d["results"][0].pop("tokens_per_s"), "tokens_per_s"),
    (lambda d: d["comparisons"][0]["candidates"]["naive"]["seconds"].pop(), "one time per round")])
def test_a_results_file_that_is_not_is_named(tmp_path, damage, match):
    doc = _doc(tmp_path, [_row("eager", 1.0)], [bm.Comparison("vs naive", "eager", "naive", {
        "eager": _cand("eager", [1.0]), "naive": _cand("naive", [2.0])})])
    damage(doc)
    with pytest.raises(ValueError, match=match):
        bm.check_results(doc)


def test_table_renders_every_row(tmp_path):
    from rich.console import Console

    doc = _doc(tmp_path, [_row("naive", 40.0), _row("ort", 250.0, variant="int8", roofline_pct=None)])
    console = Console(width=200, record=True)
    console.print(bm.results_table(doc["results"]))
    text = console.export_text()
    assert "naive" in text and "int8" in text and "250.0" in text


def test_summary_takes_its_gains_from_the_comparisons(tmp_path):
    rows = [_row("ort", 100.0, new_tokens=124, extra={"file_mb": 9.5, "load_s": 0.25}),
            _row("ort", 400.0, batch=8, new_tokens=124),
            _row("ort", 90.0),
            _row("ort", 180.0, scenario="speculative", extra={"drafter": "ngram"}),
            _row("eager", 50.0, new_tokens=124, peak_mem_mb=99.0)]
    comparisons = [
        bm.Comparison("batch", "s", "b", {"s": _cand("ort", [2.0], batch=8, tokens=800),
                                          "b": _cand("ort", [1.0])}),  # 4x, whatever the rows say
        bm.Comparison("vs naive", "s", "b", {"s": _cand("ort", [1.0]), "b": _cand("naive", [3.0])}),
        bm.Comparison("speculative", "s", "b", {"s": _cand("ort", [1.0], drafter="ngram"),
                                                "b": _cand("ort", [2.5])})]
    table = bm.summary_table(_doc(tmp_path, rows, comparisons)).splitlines()
    assert len(table) == 2 + 2
    ort = next(line for line in table if line.startswith("| ort "))
    assert [c.strip() for c in ort.split("|")[1:-1]] == [
        "ort", "fp32", "9.5", "0.25", "100.0", "400.0", "-", "4.00x", "3.00x", "180.0 (2.50x)",
        "-", "-", "-", "12"]
    lines = bm.comparisons_table(_doc(tmp_path, rows, comparisons)).splitlines()
    assert lines[2].split("|")[1:-1] == [" batch ", " ort b8 ", " ort ", " 1 ", " 4.00x ", " 4.00-4.00x "]


def test_serving_table_has_one_row_per_server_and_concurrency(tmp_path):
    serve = {"ttft_p95_ms": 9.0, "itl_p50_ms": 2.0, "itl_p95_ms": 4.5, "failed": 0}
    rows = [_row("ort", 900.0, batch=16, scenario="serve", ttft_ms=6.0, extra=serve),
            _row("ort", 200.0, batch=1, scenario="serve", ttft_ms=3.0, extra=serve),
            _row("ort", 250.0)]
    lines = bm.serving_table(_doc(tmp_path, rows, [])).splitlines()
    assert len(lines) == 2 + 2
    assert [c.strip() for c in lines[2].split("|")[1:-1]][:8] == [
        "ort", "fp32", "1", "200.0", "-", "3.0 / 9.0", "2.0 / 4.5", "0"]
    assert lines[3].split("|")[3].strip() == "16"


def test_charts_draw_one_series_per_backend_and_variant(tmp_path):
    from slm_export.benchmark import plots

    serve = {"ttft_p95_ms": 9.0, "itl_p50_ms": 2.0, "itl_p95_ms": 4.5, "failed": 0}
    rows = [*(_row("ort", 100.0 * c, batch=c, scenario="serve", extra={**serve, "clients": c})
              for c in (1, 4, 16)),
            *(_row("ort", 100.0 * b, batch=b, new_tokens=124, variant="int8") for b in (1, 8, 32))]
    data = plots.chart_data(_doc(tmp_path, rows))
    assert data["serving"]["series"] == {"ort": {c: {"tokens_per_s": 100.0 * int(c), "itl_p95_ms": 4.5}
                                                 for c in ("1", "4", "16")}}
    assert data["decode"]["series"] == {"ort int8": {"1": 100.0, "8": 800.0, "32": 3200.0}}
    assert [p.name for p in plots.draw(_doc(tmp_path, rows), tmp_path / "charts")] == [
        "decode.png", "serving.png", "charts.json"]


@pytest.mark.parametrize("page", ["bench/RESULTS.md", "README.md"])
def test_published_tables_and_charts_are_regenerated_from_committed_results(page):
    """Every table between <!-- NAME: FILE --> and <!-- end --> is what ``python bench/report.py``
    makes of a committed results file: no published number without its source."""
    report = _bench_report()
    root = report.ROOT
    text = (root / page).read_text()
    sources = {m.group(3) for m in bm.report.BLOCK.finditer(text)}
    assert sources == {report.LATEST}, sources
    assert bm.regenerate(text, root, report.TABLES) == text


def _bench_report():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "report.py"
    spec = importlib.util.spec_from_file_location("bench_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_targets_say_met_or_not_from_rows_and_comparisons(tmp_path):
    report = _bench_report()
    rows = [_row("ort", 300.0, new_tokens=124, roofline_pct=95.0),
            _row("ort", 500.0, variant="int4", new_tokens=124, extra={"top1_agreement": 0.912}),
            _row("ort", 250.0, variant="int8", new_tokens=124)]
    comparisons = [
        bm.Comparison("vs naive", "s", "b", {"s": _cand("eager", [1.0]), "b": _cand("naive", [2.0])}),
        bm.Comparison("batch", "s", "b", {"s": _cand("ort", [2.0], batch=8, tokens=800),
                                          "b": _cand("ort", [1.0])}),
        bm.Comparison("engine", "ort", "e", {"ort": _cand("ort", [1.0], variant="int8"),
                                             "e": _cand("ctranslate2", [0.97], variant="int8")}),
        bm.Comparison("speculative", "s", "b", {"s": _cand("ort", [1.0], drafter="ngram"),
                                                "b": _cand("ort", [1.45])})]
    got = {cells[0]: cells[1:] for line in report.targets_table(_doc(tmp_path, rows, comparisons))
           .splitlines()[2:] for cells in [[c.strip() for c in line.split("|")[1:-1]]]}
    assert got["ort fp32, batch 1: >= 90% of the fp32 roofline (one bandwidth reading, not paired)"] \
        == ["95%", "yes"]
    assert got["eager, batch 1: >= 2.5x naive"] == ["2.00x", "no"]
    assert got["torchscript, batch 1: >= 2.5x naive"] == ["not measured", "-"]
    assert got["ort fp32: batch 8 >= 4.0x its batch 1"] == ["4.00x", "yes"]
    assert got["ort int4, batch 1: >= 1.5x int8 (rows compared)"] == ["2.00x", "yes"]
    assert got["ort int4: top-1 agreement with fp32 >= 0.95"] == ["0.912", "no"]
    assert got["ort int8, batch 1: >= 1x ctranslate2 int8"] == ["0.97x", "no"]
    assert got["ort fp32, batch 1: >= 1x llama.cpp f32"] == ["not measured", "-"]
    assert got["ort + ngram speculation: >= 1.5x its plain greedy"] == ["1.45x", "no"]
