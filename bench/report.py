"""The project's speed targets, judged on a results file, and the regeneration of the pages
that publish the latest run (bench/RESULTS.md and README.md's blocks, and the charts).

    python bench/report.py            # rebuild every generated block and chart from bench/results/

The package renders results, summaries and comparisons (``slm_export.benchmark``); the
targets are this project's goals (its issues'), so they live here, beside the bench. Every
target reads a row or a comparison of the file; a ratio comes from a paired comparison
unless its name says the rows are compared.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from slm_export import benchmark as bm
from slm_export.benchmark.report import find_gain

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("bench/RESULTS.md", "README.md")
CHARTS = ROOT / "docs" / "charts"
LATEST = "bench/results/latest.json"


def _decode(rows, backend: str, variant: str = "fp32", batch: int = 1, new_tokens: int = 124):
    return next((r for r in rows if r.get("scenario") == "decode" and r["backend"] == backend
                 and r["variant"] == variant and r["batch"] == batch
                 and r["new_tokens"] == new_tokens), None)


def targets(doc: dict[str, Any]) -> list[tuple[str, float | None, float, str]]:
    """(target, measured or None, goal, how it is shown) for each target; a negative goal
    means "at most" its magnitude."""
    rows, out = doc["results"], []
    ort = _decode(rows, "ort")
    out.append(("ort fp32, batch 1: >= 90% of the fp32 roofline (one bandwidth reading, not paired)",
                ort and ort["roofline_pct"], 90, "{:.0f}%"))
    for backend, goal in (("eager", 2.5), ("torchscript", 2.5), ("compiled", 3.0)):
        out.append((f"{backend}, batch 1: >= {goal}x naive",
                    find_gain(doc, "vs naive", backend=backend, variant="fp32"), goal, "{:.2f}x"))
    for backend, goal in (("ort", 4.0), ("compiled", 3.0)):
        out.append((f"{backend} fp32: batch 8 >= {goal}x its batch 1",
                    find_gain(doc, "batch", backend=backend, variant="fp32", batch=8), goal, "{:.2f}x"))
    int4, int8 = _decode(rows, "ort", "int4"), _decode(rows, "ort", "int8")
    out.append(("ort int4, batch 1: >= 1.5x int8 (rows compared)",
                int4["tokens_per_s"] / int8["tokens_per_s"] if int4 and int8 else None, 1.5, "{:.2f}x"))
    out.append(("ort int4: top-1 agreement with fp32 >= 0.95", int4 and int4.get("top1_agreement"),
                0.95, "{:.3f}"))
    for engine, theirs in (("ctranslate2", ("float32", "int8")), ("llama.cpp", ("f32", "q8_0"))):
        for ours, their in zip(("fp32", "int8"), theirs, strict=True):
            out.append((f"ort {ours}, batch 1: >= 1x {engine} {their}",
                        _engine_gain(doc, engine, their), 1.0, "{:.2f}x"))
    for c in doc.get("comparisons", []):
        if c["kind"] == "speculative":
            s = c["candidates"][c["subject"]]
            name = s["backend"] + ("" if s["variant"] == "fp32" else " " + s["variant"])
            out.append((f"{name} + {s['drafter']} speculation: >= 1.5x its plain greedy",
                        bm.comparison_gain(c), 1.5, "{:.2f}x"))
    out += serving_targets(doc)
    return out


def _engine_gain(doc, engine: str, variant: str) -> float | None:
    for c in doc.get("comparisons", []):
        base = c["candidates"][c["base"]]
        if c["kind"] == "engine" and base["backend"] == engine and base["variant"] == variant:
            return bm.comparison_gain(c)
    return None


def serving_targets(doc) -> list[tuple[str, float | None, float, str]]:
    """slm-serve under load (bench/test_serving.py): C = 16 against C = 1 on ort fp32, and
    against llama.cpp's server at C = 16."""
    serve = {(r["backend"], r["variant"], r["batch"]): r for r in doc["results"]
             if r.get("scenario") == "serve"}
    one, sixteen = serve.get(("ort", "fp32", 1)), serve.get(("ort", "fp32", 16))
    llama = next((r for (b, _, c), r in serve.items() if b.startswith("llama.cpp") and c == 16), None)
    both = one is not None and sixteen is not None
    return [
        ("serve ort fp32: C = 16 >= 4x the tokens/s of C = 1",
         find_gain(doc, "serve", backend="ort", variant="fp32"), 4.0, "{:.2f}x"),
        ("serve ort fp32: inter-token p95 at C = 16 <= 3x C = 1's",
         sixteen["itl_p95_ms"] / one["itl_p95_ms"] if both else None, -3.0, "{:.2f}x"),
        ("serve ort fp32 at C = 16: >= 1x llama.cpp's server (same load)",
         sixteen["tokens_per_s"] / llama["tokens_per_s"] if sixteen and llama else None, 1.0, "{:.2f}x"),
    ]


def targets_table(doc: dict[str, Any]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for name, value, goal, shown in targets(doc):  # a negative goal: at most -goal
        met = value is not None and (value >= goal if goal >= 0 else value <= -goal)
        cells = ("not measured", "-") if value is None else (shown.format(value), "yes" if met else "no")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


TABLES = {**bm.TABLES, "targets": targets_table}


def main() -> int:
    for page in PAGES:
        path = ROOT / page
        path.write_text(bm.regenerate(path.read_text(), ROOT, TABLES))
    doc = bm.load_results(ROOT / LATEST)
    from slm_export.benchmark import plots

    for chart in plots.draw(doc, CHARTS):
        print(f"wrote {chart.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
