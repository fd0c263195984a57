"""Tables of a results file (``results.py``): the terminal table, and the markdown tables
published in README.md and bench/RESULTS.md, regenerated from the committed file.

- ``markdown_table``: every row;
- ``summary_table``: one row per backend and variant (what a deployment chooses between);
- ``comparisons_table``: every comparison's gain with its per-round range;
- ``serving_table``: the server under load, one row per backend, variant and concurrency.
A generated block in a markdown file is ``<!-- NAME: FILE -->`` ... ``<!-- end -->`` (NAME a
key of the tables map, FILE relative to the repository root); ``regenerate`` rebuilds them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slm_export.benchmark.results import check_results, comparison_gain, comparison_range

COLUMNS = (("backend", "backend"), ("variant", "variant"), ("scenario", "scenario"),
           ("batch", "batch"), ("prompt", "prompt_tokens"), ("new tok", "new_tokens"),
           ("tokens/s", "tokens_per_s"), ("min-max", "tokens_per_s_range"),
           ("TTFT ms", "ttft_ms"), ("step ms p50/p95", "itl_ms"), ("mem MB", "peak_mem_mb"),
           ("% roofline", "roofline_pct"), ("compile s", "compile_s"), ("rounds", "rounds"),
           ("checked", "check"))
SCENARIO_ORDER = {"decode": 0, "speculative": 1, "prefill": 2, "serve": 3}


def _cell(row: dict[str, Any], key: str) -> str:
    """One table cell of a results row."""
    if key == "tokens_per_s_range":
        lo, hi = row.get("tokens_per_s_min"), row.get("tokens_per_s_max")
        return "-" if lo is None else f"{lo:.1f}-{hi:.1f}"
    if key == "itl_ms":
        p50, p95 = row.get("itl_p50_ms"), row.get("itl_p95_ms")
        return "-" if p50 is None else f"{p50:.2f} / {p95:.2f}"
    if key == "check":
        if row.get("acceptance") is not None:
            return (f"{row['parity']}; {row['drafter']} acceptance {row['acceptance']:.0%}, "
                    f"{row['tokens_per_verify_step']} tok/verify")
        return row.get("parity") or "-"
    value = row.get(key)
    if value is None:
        return "-"
    if key in ("peak_mem_mb", "roofline_pct"):
        return f"{value:.0f}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _sorted_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (SCENARIO_ORDER.get(r.get("scenario"), 4), r["batch"],
                                       -r["new_tokens"], r.get("prompt_tokens", 0),
                                       -r["tokens_per_s"]))


def results_table(rows: list[dict[str, Any]], title: str = "slm-export benchmark"):
    """A rich Table of the rows (the same cells as ``markdown_table``)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for name, _ in COLUMNS:
        table.add_column(name)
    for row in _sorted_rows(rows):
        table.add_row(*(escape(_cell(row, key)) for _, key in COLUMNS))
    return table


def _markdown(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body]) + "\n"


def markdown_table(doc: dict[str, Any]) -> str:
    """Every row of a results file."""
    return _markdown([name for name, _ in COLUMNS],
                     [[_cell(r, key) for _, key in COLUMNS] for r in _sorted_rows(doc["results"])])


def label(candidate: dict[str, Any]) -> str:
    """A candidate as the tables name it: backend, variant, batch, drafter."""
    parts = [candidate["backend"]]
    if candidate.get("variant", "fp32") != "fp32":
        parts.append(candidate["variant"])
    if candidate.get("drafter"):
        parts.append(f"+ {candidate['drafter']}")
    if candidate.get("batch", 1) != 1:
        parts.append(f"b{candidate['batch']}")
    if candidate.get("clients"):
        parts.append(f"C={candidate['clients']}")
    return " ".join(parts)


def find_gain(doc: dict[str, Any], kind: str, **subject) -> float | None:
    """The gain of the ``kind`` comparison whose subject has these fields, or None."""
    for c in doc.get("comparisons", []):
        cand = c["candidates"][c["subject"]]
        if c["kind"] == kind and all(cand.get(k) == v for k, v in subject.items()):
            return comparison_gain(c)
    return None


def comparisons_table(doc: dict[str, Any]) -> str:
    """Every comparison: what against what, rounds, the gain and its per-round range."""
    body = []
    for c in doc.get("comparisons", []):
        lo, hi = comparison_range(c)
        subject, base = c["candidates"][c["subject"]], c["candidates"][c["base"]]
        body.append([c["kind"], label(subject), label(base), str(len(subject["seconds"])),
                     f"{comparison_gain(c):.2f}x", f"{lo:.2f}-{hi:.2f}x"])
    return _markdown(["comparison", "subject", "against", "rounds", "gain", "per round"], body)


def _find(rows: list[dict[str, Any]], **want) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in want.items())), None)


def summary_table(doc: dict[str, Any]) -> str:
    """One row per backend and variant: file size, load time, decode tokens/s at batch 1 / 8 /
    32, the paired gains (batch 8 over 1, over naive, each drafter over plain greedy), the
    128-token prefill and peak memory."""
    rows, body = doc["results"], []
    seen: list[tuple[str, str]] = []
    for r in _sorted_rows(rows):
        if r.get("scenario") != "serve" and (r["backend"], r["variant"]) not in seen:
            seen.append((r["backend"], r["variant"]))

    def times(value):
        return "-" if value is None else f"{value:.2f}x"

    for backend, variant in seen:
        same = [r for r in rows if r["backend"] == backend and r["variant"] == variant]
        b1, b8, b32 = (_find(same, scenario="decode", batch=b, new_tokens=124) for b in (1, 8, 32))
        prefill = _find(same, scenario="prefill", prompt_tokens=128)
        me = {"backend": backend, "variant": variant}
        spec = []
        for drafter in ("ngram", "ngram+data", "draft"):
            row = _find(same, scenario="speculative", drafter=drafter)
            g = find_gain(doc, "speculative", drafter=drafter, **me)
            spec.append("-" if row is None else f"{row['tokens_per_s']:.1f}"
                        + ("" if g is None else f" ({g:.2f}x)"))
        file_mb, load_s = same[0].get("file_mb"), same[0].get("load_s")
        peak = max((r["peak_mem_mb"] for r in same if r.get("peak_mem_mb") is not None), default=None)
        body.append([backend, variant, "-" if file_mb is None else f"{file_mb:.1f}",
                     "-" if load_s is None else f"{load_s:.2f}",
                     *("-" if x is None else f"{x['tokens_per_s']:.1f}" for x in (b1, b8, b32)),
                     times(find_gain(doc, "batch", batch=8, **me)),
                     times(find_gain(doc, "vs naive", **me)), *spec,
                     "-" if prefill is None else f"{prefill['ttft_ms']:.1f}",
                     "-" if peak is None else f"{peak:.0f}"])
    return _markdown(["backend", "variant", "file MB", "load s", "b1 tok/s", "b8 tok/s", "b32 tok/s",
                      "b8 / b1", "vs naive", "ngram spec. tok/s", "ngram+data spec. tok/s",
                      "draft spec. tok/s", "prefill 128 ms", "peak mem MB"], body)


def serving_table(doc: dict[str, Any]) -> str:
    """The ``serve`` rows: concurrent clients, aggregate tokens/s (median run and range), time
    to first token and inter-token latency (p50 / p95) and failed requests."""
    rows = sorted((r for r in doc["results"] if r.get("scenario") == "serve"),
                  key=lambda r: (r["backend"], r["variant"], r["batch"]))

    def ms(row, p50, p95):
        return "-" if row.get(p50) is None else f"{row[p50]:.1f} / {row[p95]:.1f}"

    body = [[r["backend"], r["variant"], str(r["batch"]), f"{r['tokens_per_s']:.1f}",
             _cell(r, "tokens_per_s_range"), ms(r, "ttft_ms", "ttft_p95_ms"),
             ms(r, "itl_p50_ms", "itl_p95_ms"), str(r.get("failed", 0)), str(r["rounds"])]
            for r in rows]
    return _markdown(["server", "variant", "clients", "tokens/s", "min-max", "TTFT ms p50/p95",
                      "inter-token ms p50/p95", "failed", "runs"], body)


TABLES: dict[str, Callable[[dict], str]] = {
    "results": markdown_table, "summary": summary_table, "comparisons": comparisons_table,
    "serving": serving_table}
BLOCK = re.compile(r"(<!-- ([a-z-]+): (\S+) -->\n)(.*?)(<!-- end -->)", re.DOTALL)


def regenerate(markdown: str, root: str | Path = ".", tables: dict | None = None) -> str:
    """``markdown`` with every generated block whose name ``tables`` knows rebuilt from its
    results file (``tables`` default: ``TABLES``)."""
    tables = tables or TABLES

    def table(m: re.Match) -> str:
        if m.group(2) not in tables:
            return m.group(0)
        doc = json.loads((Path(root) / m.group(3)).read_text())
        check_results(doc)
        return m.group(1) + tables[m.group(2)](doc) + m.group(5)

    return BLOCK.sub(table, markdown)
