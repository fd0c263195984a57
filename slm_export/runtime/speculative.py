"""Speculative decoding: cheap drafts, verified K at a time by the one backend's ``score``.

A verify step feeds each row's pending token plus K drafted tokens in one forward pass
(``Backend.forward(..., every=True)``): logits after each of them. Draft i is kept when the target agrees —
greedy: it is the argmax; sampling: with probability p(draft) (the standard accept/reject
rule for a deterministic draft, whose q is one-hot), and a rejected position draws from p
with the draft removed — so the output has exactly the target's distribution. The batch
keeps the accepted prefix common to its active rows (n = min over rows): a row that
accepted further emits its draft at position n, which the rule accepted; the others emit
their resampled (or, at n = K, bonus) token. The cache is rewound to the kept positions.
Each row is verified against its own sampling controls (the penalties count the drafts
before a position as generated), so greedy speculation is plain greedy and sampling keeps
its distribution with every control.

Drafts (``Drafter``): ``NgramDrafter`` (prompt lookup: the continuation of the longest
recent n-gram match in the row's own history, no second model; else, optionally, from the
n-gram counts of the training text, ``ngram_table.py``) and ``ModelDrafter`` (a smaller
model of the same tokenizer through any backend, greedy, drafting fewer tokens where it is
unsure).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from slm_export.errors import SlmError
from slm_export.runtime.base import Backend, State, left_pad
from slm_export.runtime.sampling import SamplingConfig, probabilities

if TYPE_CHECKING:
    from slm_export.runtime.ngram_table import NgramTable

SPECULATIVE = ("ngram", "draft")


class Drafter(Protocol):
    def propose(self, history: Sequence[Sequence[int]], k: int) -> list[list[int]]:
        """Up to ``k`` guessed next tokens per row; ``history`` ends with the pending token."""

    def commit(self, accepted: int) -> None:
        """How many of the last proposals the batch kept (each row then emitted one more)."""

    def keep(self, rows: Sequence[int]) -> None:
        """The batch is now these rows of the last one, in this order."""

    def reset(self) -> None:
        """Rows joined: forget what was drafted; the next ``propose`` starts from the histories."""


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the row's last n tokens (n from
    ``max_ngram`` down to ``min_ngram``) and propose what followed it.

    No match of at least ``min_ngram`` tokens: the drafts of ``table`` (an ``NgramTable`` of
    the text the model learned, ``generate.py --ngram-data``), else none and a plain decode
    step. A single repeated token predicts little: drafts after 1-token matches were mostly
    rejected and made decoding no faster, hence ``min_ngram`` 2.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2, table: NgramTable | None = None):
        self.max_ngram, self.min_ngram, self.table = max_ngram, min_ngram, table

    def propose(self, history: Sequence[Sequence[int]], k: int) -> list[list[int]]:
        drafts = [self._lookup(list(row), k) for row in history]
        if self.table is not None:
            drafts = [d or self.table.draft(row, k) for d, row in zip(drafts, history, strict=True)]
        return drafts

    def _lookup(self, row: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(row) - 1), self.min_ngram - 1, -1):
            tail = row[-n:]
            for start in range(len(row) - n - 1, -1, -1):  # latest match first
                if row[start:start + n] == tail:
                    return row[start + n:start + n + k]
        return []

    def commit(self, accepted: int) -> None:
        pass

    def keep(self, rows: Sequence[int]) -> None:
        pass

    def reset(self) -> None:
        pass


class ModelDrafter:
    """Greedy drafts from a smaller model through any backend, its cache kept in step with
    the stream's history: after each verify step it is rewound to the kept drafts and fed
    the tokens it has not seen. Its own window re-prefills the rows' last half when full.

    A step drafts up to ``k`` tokens but stops after a draft the draft model itself gives
    less than ``min_confidence`` probability in some row: the guesses after it would mostly
    be rejected, and each costs a forward pass of the draft (0: always ``k``).
    """

    def __init__(self, backend: Backend, min_confidence: float = 0.5):
        self.backend = backend
        self.min_confidence = min_confidence
        self.window = backend.config.block_size
        self._state: State | None = None
        self._fed: list[int] = []  # per row: history tokens in the draft cache, from the start
        self._kept_drafts = 0  # drafts of the last proposal still in the cache

    def propose(self, history: Sequence[Sequence[int]], k: int) -> list[list[int]]:
        device = self.backend.device
        pending = [len(h) - fed for h, fed in zip(history, self._fed, strict=False)] or [0]
        if self._state is None or self._state.length + max(pending) + k - 1 > self.window:
            rows = [list(h[-(self.window // 2):]) for h in history]
            ids, mask = left_pad(rows, device)
            logits, self._state = self.backend.prefill(ids, mask)
        else:
            if len(set(pending)) != 1:
                raise ValueError(f"rows advanced unevenly since the last proposal: {pending}")
            ids = torch.tensor([h[fed:] for h, fed in zip(history, self._fed, strict=True)],
                               device=device)
            logits, self._state = self.backend.forward(ids, self._state)
        self._fed = [len(h) for h in history]
        drafts = [self._pick(logits)]
        while len(drafts) < k and self._confident(logits):
            logits, self._state = self.backend.forward(drafts[-1], self._state)
            drafts.append(self._pick(logits))
        self._kept_drafts = len(drafts) - 1  # the last draft was never fed
        return torch.stack(drafts, dim=1).tolist()

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The greedy guess per row, as token ids (a draft with its own vocabulary scores
        ``backend.vocab_ids`` only)."""
        best = logits.argmax(-1)
        ids = getattr(self.backend, "vocab_ids", None)
        return best if ids is None else ids[best]

    def _confident(self, logits: torch.Tensor) -> bool:
        """Every row's latest draft has at least ``min_confidence`` probability."""
        if self.min_confidence <= 0:
            return True
        return bool((torch.softmax(logits, -1).amax(-1) >= self.min_confidence).all())

    def commit(self, accepted: int) -> None:
        """Keep the accepted drafts in the cache; the bonus token is fed next time."""
        keep = min(accepted, self._kept_drafts)
        drop = self._kept_drafts - keep
        if drop:
            self._state = self.backend.rewind(self._state, self._state.length - drop)
        self._fed = [fed + keep for fed in self._fed]
        self._kept_drafts = 0

    def keep(self, rows: Sequence[int]) -> None:
        if self._state is not None:
            self._state = self.backend.select(self._state, rows) if rows else None
            self._fed = [self._fed[i] for i in rows]

    def reset(self) -> None:
        self._state, self._fed, self._kept_drafts = None, [], 0


def load_draft(name: str, path, target: Backend, variant: str = "fp32",
               vocab_ids: torch.Tensor | None = None) -> Backend:
    """The draft model for ``ModelDrafter``: backend ``name`` on ``path``, on the target's
    device, sharing its vocabulary (``SlmError`` otherwise); ``vocab_ids`` (ort only): it
    guesses among these tokens only, its lm_head cut to them (``runtime.draft_vocab``).

    An ort draft on the CPU runs with one intra-op thread: it runs in turn with the target,
    and a second ORT thread pool spinning on the same cores would slow both. Its precision
    (``variant``: int8, int4, fp16) changes only its speed and how often its guesses are
    accepted, never the output.
    """
    from slm_export.runtime import load_backend

    options = {"vocab_ids": vocab_ids} if vocab_ids is not None else {}
    if name == "ort" and target.device.type == "cpu":
        options["threads"] = 1
    if vocab_ids is not None and name != "ort":
        raise SlmError(f"a draft vocabulary needs an ort draft (--draft-backend ort), not {name}")
    draft = load_backend(name, path, target.device, variant, **options)
    if draft.config.vocab_size != target.config.vocab_size:
        raise SlmError(f"the draft model has a vocabulary of {draft.config.vocab_size}, the "
                       f"model {target.config.vocab_size}: a draft must share the tokenizer")
    return draft


def pad_drafts(drafts: list[list[int]]) -> list[list[int]]:
    """Rows' drafts cut to the longest one, short rows padded with their last draft (or 0):
    every row must feed K tokens; a padded guess is simply rejected."""
    k = max((len(d) for d in drafts), default=0)
    return [(d + [d[-1] if d else 0] * k)[:k] for d in drafts]


def accepted_runs(logits: torch.Tensor, drafts: torch.Tensor, sampling: SamplingConfig,
                  generator: torch.Generator | None):
    """How many leading drafts each row accepts, from the target's (adjusted) logits after
    each fed token: logits (B, K + 1, V), drafts (B, K) -> (run (B,), what ``tokens_at``
    reads: the argmaxes when greedy, else the probabilities)."""
    B, K = drafts.shape
    if sampling.is_greedy:
        scored = logits.argmax(-1)  # (B, K + 1)
        accepted = scored[:, :K] == drafts
    else:
        scored = probabilities(logits.reshape(B * (K + 1), -1), sampling).view(B, K + 1, -1)
        p_draft = scored[:, :K].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, K)
        u = torch.rand(B, K, generator=generator, device=logits.device)
        accepted = u < p_draft
    return accepted.long().cumprod(dim=1).sum(dim=1), scored


def tokens_at(n: int, scored: torch.Tensor, drafts: torch.Tensor, run: torch.Tensor,
              sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Each row's tokens to emit when the batch keeps ``n`` drafts: (B, n + 1), its first n
    drafts, then its own token at position n."""
    K = drafts.size(1)
    if sampling.is_greedy:
        last = scored[:, n]
    else:
        last = _token_at(scored[:, n], drafts[:, n] if n < K else None, run > n, generator)
    return torch.cat([drafts[:, :n], last.unsqueeze(1)], dim=1)


def _token_at(probs: torch.Tensor, draft: torch.Tensor | None, kept: torch.Tensor,
              generator: torch.Generator | None) -> torch.Tensor:
    """Position n's token: the draft where the row accepted it; else a draw from p without
    the rejected draft (renormalised), or from p itself past the last draft."""
    if draft is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    one_hot = torch.zeros_like(probs).scatter_(-1, draft.unsqueeze(-1), 1.0)
    residual = probs * (1 - one_hot)
    # A row that kept its draft may have had p(draft) = 1 (nothing left): draw its draft.
    residual = torch.where(kept.unsqueeze(-1) | (residual.sum(-1, keepdim=True) <= 0), one_hot, residual)
    drawn = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
    return torch.where(kept, draft, drawn)
