"""Optimizer and learning-rate schedule: AdamW with decay / no-decay groups, warmup + cosine.

Both are pure functions of their inputs, so a resumed run rebuilds exactly the same
optimizer groups and the same learning rate at every step.
"""

from __future__ import annotations

import math

import torch

# AdamW's epsilon: PyTorch's default, which nanoGPT and llama2.c use too (neither sets eps).
# eps bounds the update m / (sqrt(v) + eps) of parameters whose gradients are (nearly) zero: with
# fp16 / bf16 autocast many small gradients underflow to exactly 0 on some steps, sqrt(v) decays
# toward 0 and a smaller eps would let a stale momentum m make a large step.
ADAM_EPS = 1e-8
ADAM_BETAS = (0.9, 0.95)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup from lr/warmup_iters to lr over ``warmup_iters`` steps, then a cosine from lr
    down to ``min_lr`` at ``decay_iters``, then ``min_lr`` (the floor) for ever after.
    """
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + coeff * (lr - min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's split: every parameter with >= 2 dims (the Linear weights and the embeddings,
    including the tied wte / lm_head matrix) decays; biases and LayerNorm gains do not.

    Each group carries the parameter names (``names``), which AdamW ignores and tests read.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a tied parameter is listed once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay],
         "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay],
         "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                   betas: tuple[float, float] = ADAM_BETAS, eps: float = ADAM_EPS,
                   device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused CUDA kernel when training on a GPU."""
    fused = device_type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
