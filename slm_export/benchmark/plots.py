"""Charts of a results file (matplotlib, PNG): what the bench measured, drawn.

- ``decode``: decode tokens/s per backend and variant at batch 1 / 8 / 32, the fp32
  roofline of each batch size drawn as a line;
- ``speculative``: each drafter's gain over plain greedy per backend (paired comparisons);
- ``ttft``: time to first token per backend (4- and 128-token prompts);
- ``serving``: slm-serve's aggregate tokens/s and p95 inter-token latency against the
  number of concurrent clients.

``chart_data`` is what each chart draws (pure, from the file alone); ``draw`` writes the PNGs
and ``charts.json``, the SHA-256 of each chart's data, so a test can tell that committed
charts were drawn from the committed results without comparing images. Every chart's
caption names the machine, threads, commit and date of the run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from slm_export.benchmark.report import label
from slm_export.benchmark.results import comparison_gain

INDEX = "charts.json"
BATCHES = (1, 8, 32)


def _caption(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    commit = (m.get("commit") or "?")[:12]
    return (f"{doc.get('preset', '')} model on {m.get('gpu') or m.get('cpu')}, {m['threads']} threads, "
            f"commit {commit}, {m.get('date', '')}")


def chart_data(doc: dict[str, Any]) -> dict[str, dict]:
    """{chart name: the series it draws} for the charts this file has data for."""
    rows, out = doc["results"], {}
    decode = {}
    for r in rows:
        if r.get("scenario") == "decode" and r["new_tokens"] == 124 and r["batch"] in BATCHES:
            decode.setdefault(label({**r, "batch": 1}), {})[str(r["batch"])] = round(r["tokens_per_s"], 1)
    if decode:
        ceiling = doc.get("roofline_tokens_per_s_fp32_batch1")
        out["decode"] = {"series": decode, "roofline_b1": ceiling}
    spec = {}
    for c in doc.get("comparisons", []):
        if c["kind"] == "speculative":
            s = c["candidates"][c["subject"]]
            spec.setdefault(label({**s, "drafter": None}), {})[s["drafter"]] = round(comparison_gain(c), 3)
    if spec:
        out["speculative"] = {"series": spec}
    ttft = {}
    for r in rows:
        if r.get("scenario") == "prefill":
            ttft.setdefault(label(r), {})[str(r["prompt_tokens"])] = round(r["ttft_ms"], 2)
    if ttft:
        out["ttft"] = {"series": ttft}
    serve = {}
    for r in rows:
        if r.get("scenario") == "serve":
            point = {"tokens_per_s": round(r["tokens_per_s"], 1), "itl_p95_ms": r.get("itl_p95_ms")}
            serve.setdefault(label({**r, "batch": 1, "clients": None}), {})[str(r["batch"])] = point
    if serve:
        out["serving"] = {"series": serve}
    return out


def digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def draw(doc: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write every chart ``chart_data`` finds data for, and the index; -> the files."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, written = chart_data(doc), []
    for name, series in data.items():
        path = out_dir / f"{name}.png"
        DRAW[name](series, _caption(doc), path)
        written.append(path)
    index = out_dir / INDEX
    index.write_text(json.dumps({name: digest(d) for name, d in data.items()}, indent=2) + "\n")
    return [*written, index]


def _bars(ax, series: dict[str, dict[str, float]], groups: list[str], ylabel: str):
    """Grouped horizontal-label bars: one group per key of the series' dicts."""
    names = list(series)
    width = 0.8 / max(1, len(groups))
    for i, group in enumerate(groups):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [series[n].get(group, 0) for n in names], width, label=group)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def _figure(title: str, caption: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.2), constrained_layout=True)
    ax.set_title(title)
    fig.supxlabel(caption, x=0.01, ha="left", fontsize=8, color="0.35")  # laid out below the axes
    return fig, ax


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def _decode(data, caption, path):
    fig, ax = _figure("Decode tokens/s (4-token prompt, 124 greedy tokens per row)", caption)
    groups = [str(b) for b in BATCHES if any(str(b) in s for s in data["series"].values())]
    _bars(ax, data["series"], groups, "tokens/s (all rows)")
    ceiling = data.get("roofline_b1")
    if ceiling:
        for i, group in enumerate(groups):
            ax.axhline(ceiling * int(group), ls="--", lw=1, color=f"C{i}")
            ax.annotate(f"fp32 roofline, batch {group}", (len(data["series"]) - 0.5, ceiling * int(group)),
                        fontsize=8, va="bottom", ha="right")
    ax.legend(title="batch", loc="upper left", bbox_to_anchor=(1, 1))  # beside the bars
    _save(fig, path)


def _speculative(data, caption, path):
    fig, ax = _figure("Speculative decoding: gain over plain greedy (paired rounds, batch 1)", caption)
    drafters = sorted({d for s in data["series"].values() for d in s})
    _bars(ax, data["series"], drafters, "x plain greedy tokens/s")
    ax.axhline(1.0, color="0.3", lw=1)
    ax.legend(title="drafter", loc="upper left", bbox_to_anchor=(1, 1))
    _save(fig, path)


def _ttft(data, caption, path):
    fig, ax = _figure("Time to first token (prefill + first sample)", caption)
    _bars(ax, data["series"], sorted({p for s in data["series"].values() for p in s}, key=int), "ms")
    ax.legend(title="prompt tokens", loc="upper left", bbox_to_anchor=(1, 1))
    _save(fig, path)


def _serving(data, caption, path):
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8), constrained_layout=True)
    fig.suptitle("slm-serve under load: C concurrent streaming clients")
    fig.supxlabel(caption, x=0.01, ha="left", fontsize=8, color="0.35")  # laid out below the axes
    for name, points in data["series"].items():
        cs = sorted(points, key=int)
        left.plot([int(c) for c in cs], [points[c]["tokens_per_s"] for c in cs], marker="o", label=name)
        right.plot([int(c) for c in cs], [points[c]["itl_p95_ms"] for c in cs], marker="o", label=name)
    for ax, ylabel in ((left, "aggregate tokens/s"), (right, "inter-token latency p95, ms")):
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    left.legend()
    _save(fig, path)


DRAW = {"decode": _decode, "speculative": _speculative, "ttft": _ttft, "serving": _serving}
