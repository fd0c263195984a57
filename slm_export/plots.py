"""Training plots (matplotlib, Agg backend): PNGs under ``<run>/plots/``.

- ``loss.png``: train vs validation loss per evaluation (from metrics.jsonl);
- ``lr.png``: the learning-rate schedule of the run;
- ``weights.png``: weight distributions (token embedding, attention, MLP, LayerNorm);
- ``attention.png``: attention weights of one layer/head on a sample prompt, recomputed from
  the block's ``c_attn`` (the model itself uses SDPA, which does not return them);
- ``summary.png``: one page of how the run went: the losses, the LR schedule, validation
  accuracy and training tokens/s per evaluation.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from slm_export import checkpoint, optim, tokenizer
from slm_export.config import TrainConfig
from slm_export.errors import SlmError, first_line

HIST_SAMPLE = 1_000_000  # values drawn per weight histogram
SAMPLE_PROMPT = "Once upon a time, there was a little girl named Lily. She liked to play"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run: skip it
    return rows


def _save(plt, fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_losses(metrics: list[dict], out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    steps = [m["step"] for m in metrics]
    ax.plot(steps, [m["train_loss"] for m in metrics], "o-", label="train")
    ax.plot(steps, [m["val_loss"] for m in metrics], "s-", label="val")
    ax.set(xlabel="step", ylabel="cross-entropy loss", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, out)


def plot_lr(train_config: dict, out: Path) -> Path:
    cfg = TrainConfig.from_dict(train_config)
    steps = list(range(cfg.max_iters))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [optim.lr_at(s, **cfg.schedule) for s in steps])
    ax.axhline(cfg.min_lr, color="gray", ls="--", lw=0.8, label=f"min_lr {cfg.min_lr:g}")
    ax.set(xlabel="step", ylabel="learning rate",
           title=f"warmup {cfg.warmup_iters}, cosine to step {cfg.decay_iters}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, out)


def plot_summary(metrics: list[dict], train_config: dict | None, out: Path) -> Path:
    """Losses, LR, validation accuracy and tokens/s on one page."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=100)
    steps = [m["step"] for m in metrics]
    (loss, lr), (acc, speed) = axes
    loss.plot(steps, [m["train_loss"] for m in metrics], marker="o", label="train")
    loss.plot(steps, [m["val_loss"] for m in metrics], marker="o", label="val")
    loss.set(title="loss", xlabel="step", ylabel="nats / token")
    loss.legend()
    if train_config:
        cfg = TrainConfig.from_dict(train_config)
        xs = range(0, cfg.max_iters + 1, max(1, cfg.max_iters // 200))
        lr.plot(list(xs), [optim.lr_at(s, **cfg.schedule) for s in xs])
    lr.set(title="learning rate", xlabel="step")
    acc.plot(steps, [m.get("val_acc", float("nan")) for m in metrics], marker="o", color="tab:green")
    acc.set(title="validation next-token accuracy", xlabel="step", ylim=(0, 1))
    rate = [(m["step"], m["tokens_per_s"]) for m in metrics if m.get("tokens_per_s")]
    speed.plot([s for s, _ in rate], [t for _, t in rate], marker="o", color="tab:purple")
    speed.set(title="training tokens/s", xlabel="step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    last = metrics[-1] if metrics else {}
    val = last.get("val_loss", float("nan"))
    fig.suptitle(f"run summary: step {last.get('step', 0)}, val loss {val:.3f}")
    return _save(plt, fig, out)


def plot_weights(state_dict: dict, out: Path) -> Path:
    groups = {
        "token embedding (wte = lm_head)": [k for k in state_dict if k.endswith("wte.weight")],
        "attention (c_attn, c_proj)": [k for k in state_dict if ".attn." in k and k.endswith("weight")],
        "MLP (c_fc, c_proj)": [k for k in state_dict if ".mlp." in k and k.endswith("weight")],
        "LayerNorm gains (ln_1, ln_2, ln_f)": [k for k in state_dict if ".ln_" in k
                                               and k.endswith("weight")],
    }
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), dpi=110)
    for ax, (title, keys) in zip(axes.flat, groups.items(), strict=True):
        tensors = [state_dict[k] for k in keys]
        ax.set_title(_histogram(ax, tensors, title) if tensors else f"{title}: none", fontsize=9)
        ax.grid(alpha=0.3)
    return _save(plt, fig, out)


def _histogram(ax, tensors: list[torch.Tensor], title: str) -> str:
    """Histogram of the finite values of ``tensors`` on ``ax`` -> the panel's title.

    Any tensor works: values go to float64, so a range as narrow as LayerNorm gains after two
    tiny steps (1 +- 1e-7) still has 80 distinct bin edges (in float32 numpy refuses: "Too
    many bins for data range"); a range too narrow even for that, or a constant, gets one bar;
    NaN / inf are left out and counted in the title. Beyond HIST_SAMPLE values the histogram
    and its mean / std use an evenly strided sample (the 30m embedding alone has 19M).
    """
    flat = torch.cat([t.detach().flatten().cpu() for t in tensors])
    non_finite = int((~torch.isfinite(flat)).sum())
    stride = max(1, flat.numel() // HIST_SAMPLE)
    values = flat[::stride].double().numpy()
    finite = values[np.isfinite(values)]
    note = f", {non_finite} non-finite left out" if non_finite else ""
    if finite.size == 0:
        return f"{title}\nno finite values ({non_finite} NaN / inf)"
    edges = np.linspace(finite.min(), finite.max(), 81)
    ax.hist(finite, bins=edges if np.all(np.diff(edges) > 0) else 1, color="tab:blue", alpha=0.8)
    return f"{title}\nmean {finite.mean():.3g}, std {finite.std():.3g}{note}"


@torch.no_grad()
def attention_weights(model, idx: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """Softmax attention (T, T) of ``layer``/``head`` for one sequence ``idx`` (1, T)."""
    cfg = model.config
    if not 0 <= layer < cfg.n_layer or not 0 <= head < cfg.n_head:
        raise SlmError(f"no layer {layer} / head {head} in a model with {cfg.n_layer} layers "
                       f"and {cfg.n_head} heads")
    model.eval()
    T = idx.size(1)
    pos = torch.arange(T, device=idx.device)
    x = model.transformer.wte(idx) + model.transformer.wpe(pos)
    for block in model.transformer.h[:layer]:
        x = block(x)
    block = model.transformer.h[layer]
    q, k, _ = block.attn.c_attn(block.ln_1(x)).split(cfg.n_embd, dim=2)
    hs = cfg.head_dim
    q = q.view(1, T, cfg.n_head, hs)[0, :, head]  # (T, hs)
    k = k.view(1, T, cfg.n_head, hs)[0, :, head]
    att = (q @ k.T) / math.sqrt(hs)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    return att.masked_fill(~causal, float("-inf")).softmax(-1)


def plot_attention(model, out: Path, prompt: str = SAMPLE_PROMPT, layer: int | None = None,
                   head: int = 0) -> Path:
    layer = model.config.n_layer - 1 if layer is None else layer
    ids = tokenizer.encode(prompt)[: model.config.block_size]
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    att = attention_weights(model, idx, layer, head).cpu().numpy()
    labels = [tokenizer.decode([i]).replace("\n", "\\n") for i in ids]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    im = ax.imshow(att, cmap="viridis", vmin=0.0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set(xlabel="key", ylabel="query", title=f"attention, layer {layer} head {head}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(plt, fig, out)


def write_all(run_dir: str | os.PathLike, layer: int | None = None, head: int = 0,
              warn: Callable[[str], None] | None = None) -> list[Path]:
    """Draw every plot for a run folder (metrics.jsonl + best.pt or ckpt.pt) -> the PNG paths.

    A run folder without a loadable checkpoint is an SlmError. A plot that fails to draw is
    skipped and reported through ``warn`` (one line each); the others are still drawn.
    """
    run_dir = Path(run_dir)
    ckpt_path = next((p for p in (run_dir / "best.pt", run_dir / "ckpt.pt") if p.is_file()), None)
    if ckpt_path is None:
        raise SlmError(f"{run_dir}: no best.pt or ckpt.pt to plot")
    model, ckpt = checkpoint.load_model(ckpt_path)  # one-line errors for bad files
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    todo = {
        "loss.png": (lambda p: plot_losses(metrics, p)) if metrics else None,
        "lr.png": (lambda p: plot_lr(ckpt["train_config"], p)) if ckpt.get("train_config") else None,
        "weights.png": lambda p: plot_weights(ckpt["model"], p),
        "attention.png": lambda p: plot_attention(model, p, layer=layer, head=head),
        "summary.png": (lambda p: plot_summary(metrics, ckpt.get("train_config"), p)) if metrics else None,
    }
    written = []
    for name, draw in todo.items():
        if draw is None:
            continue
        try:
            written.append(draw(out / name))
        except Exception as e:  # a plot is a by-product: one line, and the other plots still come
            if warn is not None:
                warn(f"{out / name} not drawn ({type(e).__name__}: {first_line(e, 120)})")
    return written
