"""One way to compare a backend with a reference (eager fp32, as a rule).

``Lockstep`` is a backend for the one loop that runs ``backend`` and feeds ``reference``
the same ids at every call (prefill, forward, select, merge), recording how the two agree:
the reference is teacher-forced along the backend's own continuation, overflow re-prefills
and batch changes included. Everything that checks a backend builds on it: the export's
verification (``export/verify.py``), the doctor's smoke runs, the bench's first-round check
and the tests.

- ``greedy(reference, backend, prompts, new_tokens)``: greedy through the loop in lockstep
  -> a ``Report`` (tokens, per-step agreement, ties, the largest logit difference);
  ``Report.check(tol)`` raises ``SlmError`` unless every token is the reference's argmax
  or a tie within ``tol`` x the reference logits' std (float noise may pick either, and
  the reference follows the backend), and every step's logits agree within it.
- ``teacher_forced(reference, backend, tokens)``: both fed the true tokens: next-token
  top-1 agreement, each one's loss and the KL divergence (``scores``: what the export's
  gates and ``slm-eval`` measure with).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.nn import functional as F

from slm_export.errors import SlmError
from slm_export.runtime.base import Backend, State
from slm_export.runtime.generation import Generation, TokenStream
from slm_export.runtime.sampling import GREEDY

REL_TOL = 5e-5  # fp32 backends: max |logit difference| / std of the reference's logits


class Step(NamedTuple):
    """One call of a ``Lockstep`` pair, per row: whether the argmaxes agree, and the margin by
    which the reference prefers its argmax over the backend's (0 where they agree); for the
    call: the largest |logit difference| and the std of the reference's logits (their scale)."""

    agree: torch.Tensor
    gap: torch.Tensor
    diff: float
    scale: float


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


class Lockstep:
    """``backend`` for the loop with ``reference`` fed the same ids at every call; ``steps``
    holds a ``Step`` per call (for the last position of each row)."""

    def __init__(self, backend: Backend, reference: Backend):
        self.backend, self.reference = backend, reference
        self.name, self.config, self.device = backend.name, backend.config, backend.device
        self.steps: list[Step] = []
        self.counted = 0  # steps already attributed to rows (``greedy``)

    def _step(self, have, s_have, want, s_want) -> tuple[torch.Tensor, State]:
        h, w = have.float().cpu(), want.float().cpu()
        if h.shape != w.shape:
            raise SlmError(f"{self.name}: logits of shape {tuple(h.shape)}, the reference "
                           f"gives {tuple(w.shape)}")
        last_h, last_w = (h, w) if h.dim() == 2 else (h[:, -1], w[:, -1])
        picked = last_h.argmax(-1, keepdim=True)
        gap = (last_w.max(-1).values - last_w.gather(-1, picked).squeeze(-1)).clamp(min=0)
        diff = (h - w).abs().max().item() if w.numel() else 0.0
        self.steps.append(Step(picked.squeeze(-1) == last_w.argmax(-1), gap, diff, w.std().item()))
        return have, self._wrap(s_have, s_want)

    def _wrap(self, s_have: State, s_want: State) -> State:
        return State(s_have.length, s_have.batch, s_have.mask, (s_have, s_want))

    def prefill(self, ids, attention_mask=None):
        ref = self.reference
        want, s_want = ref.prefill(ids.to(ref.device), _to(attention_mask, ref.device))
        return self._step(*self.backend.prefill(ids, attention_mask), want, s_want)

    def forward(self, tokens, state, every=False):
        s_have, s_want = state.cache
        want, s_want = self.reference.forward(tokens.to(self.reference.device), s_want, every)
        return self._step(*self.backend.forward(tokens, s_have, every), want, s_want)

    def rewind(self, state, length):
        s_have, s_want = state.cache
        return self._wrap(self.backend.rewind(s_have, length), self.reference.rewind(s_want, length))

    def select(self, state, rows):
        s_have, s_want = state.cache
        return self._wrap(self.backend.select(s_have, rows), self.reference.select(s_want, rows))

    def merge(self, states):
        if len(states) == 1:
            return states[0]
        have = self.backend.merge([s.cache[0] for s in states])
        return self._wrap(have, self.reference.merge([s.cache[1] for s in states]))


@dataclass
class Report:
    """A greedy continuation in lockstep: ``calls`` (a ``Step`` per backend call) and, per row,
    each sampled token's agreement with the reference's argmax and its gap (``agree``,
    ``gaps``: lists per row, in the order the rows were given)."""

    name: str
    generation: Generation
    calls: list[Step]
    agree: list[list[bool]] = field(default_factory=list)
    gaps: list[list[float]] = field(default_factory=list)

    @property
    def ties(self) -> list[int | None]:
        """Per row, the first token picked at a tie (None: none; up to there the row is the
        reference's own greedy text)."""
        return [next((i for i, a in enumerate(row) if not a), None) for row in self.agree]

    @property
    def agreement(self) -> float:
        decided = [a for row in self.agree for a in row]
        return sum(decided) / len(decided) if decided else 1.0

    @property
    def tokens(self) -> int:
        return sum(len(row) for row in self.agree)

    @property
    def max_diff(self) -> float:
        return max((s.diff for s in self.calls), default=0.0)

    @property
    def tie_count(self) -> int:
        return sum(not a for row in self.agree for a in row)

    def check(self, rel_tol: float = REL_TOL) -> Report:
        """Raise ``SlmError`` at the first call whose logits differ by more than ``rel_tol`` x
        the reference's std, or whose token is neither the reference's argmax nor a tie."""
        for n, step in enumerate(self.calls):
            tol = rel_tol * step.scale
            if not step.diff <= tol:
                raise SlmError(f"{self.name}: greedy continuation, call {n}: max |logit diff| "
                               f"vs the reference {step.diff:.3g} > {tol:.3g}")
            if not bool((step.gap <= tol).all()):
                raise SlmError(f"{self.name}: greedy continuation differs from the reference at "
                               f"call {n} ({len(self.agree)} prompts): not a tie "
                               f"({float(step.gap.max()):.3g} > {tol:.3g})")
        return self


def greedy(reference: Backend, backend: Backend, prompts: Sequence[Sequence[int]], new_tokens: int,
           overflow: str = "rebase") -> Report:
    """``backend``'s greedy continuation of ``prompts`` (no stop token) beside ``reference``."""
    pair = Lockstep(backend, reference)
    stream = TokenStream(pair, prompts, max_new_tokens=new_tokens, sampling=GREEDY,
                         overflow=overflow, stop_id=None)
    agree: dict[int, list[bool]] = {i: [] for i in stream.rows}
    gaps: dict[int, list[float]] = {i: [] for i in stream.rows}
    for _ in stream:  # the calls of a step cover the stream's batch after it, in order
        calls = pair.steps[len(pair.steps) - _calls_since(pair, stream):]
        rows = stream.batch
        for row, a, gap in zip(rows, torch.cat([c.agree for c in calls]).tolist(),
                               torch.cat([c.gap for c in calls]).tolist(), strict=True):
            agree[row].append(a)
            gaps[row].append(gap)
    return Report(backend.name, stream.result(), pair.steps, list(agree.values()), list(gaps.values()))


def _calls_since(pair: Lockstep, stream: TokenStream) -> int:
    """How many of the pair's last calls belong to the stream's last step."""
    n = len(pair.steps) - pair.counted
    pair.counted = len(pair.steps)
    return n


def scores(want: torch.Tensor, have: torch.Tensor, targets: torch.Tensor) -> dict:
    """The quality of ``have``'s next-token logits against the reference's ``want`` (both
    (..., V)) on the true ``targets`` (...): each one's mean loss in nats, ``have``'s next-token
    accuracy, top-1 agreement with ``want`` and mean KL(want || have) per token. What the
    export's gates and ``slm-eval`` both measure with."""
    want, have = want.float().flatten(0, -2).cpu(), have.float().flatten(0, -2).cpu()
    targets = targets.flatten().cpu()
    return {"loss_fp32": F.cross_entropy(want, targets).item(),
            "loss": F.cross_entropy(have, targets).item(),
            "accuracy": (have.argmax(-1) == targets).float().mean().item(),
            "top1": (have.argmax(-1) == want.argmax(-1)).float().mean().item(),
            "kl": kl_divergence(want, have).mean().item()}


@torch.inference_mode()
def all_logits(backend: Backend, ids: torch.Tensor) -> torch.Tensor:
    """Every position's next-token logits (B, T, V) of ``ids`` (B, T), in one call."""
    return backend.forward(ids.to(backend.device), backend.start(ids.size(0)), every=True)[0]


@torch.inference_mode()
def teacher_forced(reference: Backend, backend: Backend, tokens: torch.Tensor) -> dict:
    """Both backends fed the true ``tokens`` (B, T): prefill half, then one token at a time
    (the decode path). -> ``scores`` of the second half."""
    half = tokens.size(1) // 2
    want, s_want = reference.prefill(tokens[:, :half].to(reference.device), None)
    have, s_have = backend.prefill(tokens[:, :half].to(backend.device), None)
    wants, haves = [], []
    for t in range(half, tokens.size(1)):
        wants.append(want.float().cpu())
        haves.append(have.float().cpu())
        if t + 1 < tokens.size(1):
            want, s_want = reference.forward(tokens[:, t].to(reference.device), s_want)
            have, s_have = backend.forward(tokens[:, t].to(backend.device), s_have)
    return scores(torch.stack(wants, 1), torch.stack(haves, 1), tokens[:, half:])


def kl_divergence(want: torch.Tensor, have: torch.Tensor) -> torch.Tensor:
    """KL(softmax(want) || softmax(have)) in nats for each row of (..., V) logits."""
    log_p, log_q = F.log_softmax(want.float(), -1), F.log_softmax(have.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)
