"""Next-token cross-entropy in chunks of rows, so a (batch x block x vocab) logits tensor never
exists.

At batch 32 x 128 tokens the GPT-2 vocabulary makes the logits 4096 x 50257: 0.8 GB in fp32
(half in bf16), plus cross-entropy's fp32 copy and a gradient for each, about 2 GB, which a
4 GB laptop GPU cannot spare beside the 30m model. ``linear_cross_entropy`` projects
``LOSS_CHUNK_ROWS`` rows at a time and computes the loss and, in the same pass, the gradients
of the hidden states and of the output matrix (the fused "linear + cross-entropy" of
Liger-Kernel): the arithmetic of the plain path, the memory of one chunk of logits.
"""

from __future__ import annotations

import torch
from torch import nn

from slm_export.model import GPT

LOSS_CHUNK_ROWS = 1024  # logits rows alive at once: 1024 x 50257 fp32 = 206 MB


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 logits -> fp32 (as cross_entropy computes under autocast); fp32, fp64 as is."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _loss_and_grad(logits: torch.Tensor, targets: torch.Tensor,
                   scale: torch.Tensor | None = None):
    """Summed cross-entropy of fp32 (or fp64) logits (r, V) against targets (r,) (-1: ignored), and with
    a ``scale`` its gradient with respect to the logits times ``scale`` (written over the
    logits), else None."""
    valid = targets != -1
    target = targets.clamp(min=0)[:, None]
    lse = logits.logsumexp(-1)
    loss = torch.where(valid, lse - logits.gather(1, target)[:, 0], 0.0).sum()
    if scale is None:
        return loss, None
    grad = logits.sub_(lse[:, None]).exp_()  # softmax
    grad.scatter_add_(1, target, torch.full_like(lse[:, None], -1.0))  # - one_hot(target)
    return loss, grad.mul_(valid[:, None]).mul_(scale)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i @ weight.T, targets_i); forward computes the gradients too, backward
    only scales them."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, grad_scale):
        wide = torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        n_valid = (targets != -1).sum().clamp(min=1).to(wide)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # d(mean)/d(logits) = (softmax - one_hot) / n_valid, times the loss scale the caller
        # will apply (GradScaler's, for fp16): the low-precision matmuls below then see the
        # same magnitudes as autograd's would, neither underflowing nor hiding an overflow
        # from GradScaler. backward divides the scale out again.
        scale = (1.0 if grad_scale is None else grad_scale) / n_valid
        grad_h = torch.zeros_like(h) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=wide) if want_w else None
        total = torch.zeros((), dtype=wide, device=h.device)
        for start in range(0, h.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = _wide(h[rows] @ weight.t())  # matmul in the autocast dtype, as lm_head's
            loss, grad = _loss_and_grad(logits, targets[rows], scale if want_h or want_w else None)
            total += loss
            if want_h:
                grad_h[rows] = grad @ weight  # (r, C)
            if want_w:
                grad_w += grad.t() @ h[rows]  # (V, C), summed in fp32 (or fp64)
        ctx.save_for_backward(grad_h, grad_w, n_valid, grad_scale)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, _, grad_scale = ctx.saved_tensors
        factor = grad_loss if grad_scale is None else grad_loss / grad_scale
        return (None if grad_h is None else grad_h * factor,
                None if grad_w is None else grad_w * factor, None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = LOSS_CHUNK_ROWS,
                         grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits ``h @ weight.T`` (h (N, C), weight (V, C)) against
    ``targets`` (N,) (-1 ignored), ``chunk_rows`` rows at a time; equal to
    ``F.cross_entropy(h @ weight.T, targets, ignore_index=-1)`` and its gradients.

    ``grad_scale``: a 0-dim tensor the caller multiplies the loss by before ``backward``
    (``GradScaler.scale``), so the gradients are formed at the magnitude autograd would use.
    """
    return _LinearCrossEntropy.apply(h, weight, targets, chunk_rows, grad_scale)


@torch.no_grad()
def loss_and_correct(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     chunk_rows: int = LOSS_CHUNK_ROWS):
    """(summed loss, number of correct argmax predictions), both 0-dim tensors on h's device,
    for h (N, C), weight (V, C), targets (N,) (-1 ignored), ``chunk_rows`` rows at a time."""
    loss = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    correct = torch.zeros((), dtype=torch.int64, device=h.device)
    for start in range(0, h.size(0), chunk_rows):
        rows = slice(start, start + chunk_rows)
        logits = h[rows] @ weight.t()
        correct += (logits.argmax(-1) == targets[rows]).sum()
        loss += _loss_and_grad(_wide(logits), targets[rows])[0]
    return loss, correct


class NextTokenLoss(nn.Module):
    """What training differentiates (and what DDP and torch.compile wrap): the GPT's mean
    next-token cross-entropy through ``linear_cross_entropy``. Checkpoints save ``gpt``."""

    def __init__(self, gpt: GPT, chunk_rows: int = LOSS_CHUNK_ROWS):
        super().__init__()
        self.gpt, self.chunk_rows = gpt, chunk_rows

    def forward(self, idx: torch.Tensor, targets: torch.Tensor,
                grad_scale: torch.Tensor | None = None) -> torch.Tensor:
        h = self.gpt.hidden_states(idx).flatten(0, 1)  # (B*T, C)
        return linear_cross_entropy(h, self.gpt.lm_head.weight, targets.reshape(-1),
                                    self.chunk_rows, grad_scale)
