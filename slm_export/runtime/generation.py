"""The one generation loop every backend shares.

``TokenStream`` drives a backend (prefill, then one decode per token), samples on the
last-position logits, stops rows at ``<|endoftext|>`` or after ``max_new_tokens``, and handles
context overflow the same way for every backend:

- ``"rebase"`` (default): when the window (``block_size`` learned positions) is full, keep the
  last half of each row's tokens, re-prefill them once, and decode from the cache again:
  about one prefill per ``block_size // 2`` new tokens.
- ``"slide"``: once the window is full, re-prefill the last ``block_size`` tokens at every
  step (nanoGPT's ``idx[:, -block_size:]`` semantics; exact, but a full forward per token).

Prompts longer than the window are cropped to their last ``block_size`` tokens. Prompts of
different lengths share a batch by left padding with an attention mask (the backend keeps
it in its state); a row's positions count its real tokens only, so each row gets the
result it would get alone for as long as the padded window has room (after a batch
rebase, rows are cut at the same moment, which a row alone might not have been).
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from slm_export.runtime.base import Backend, State, host_threads, left_pad
from slm_export.runtime.sampling import SamplingConfig, make_generator, sample
from slm_export.runtime.speculative import Drafter, pad_drafts, verify
from slm_export.tokenizer import EOT_ID, get_encoding

OVERFLOW_POLICIES = ("rebase", "slide")


@dataclass
class Stats:
    prefills: int = 0
    decodes: int = 0
    verify_steps: int = 0  # speculative forward passes (each scores 1 + K tokens per row)
    drafted: int = 0  # draft tokens scored, active rows only
    accepted: int = 0  # of them kept
    prompt_tokens: int = 0  # real tokens of the (cropped) prompts, all rows
    new_tokens: int = 0  # tokens emitted, all rows, <|endoftext|> excluded
    time_to_first_token: float | None = None  # seconds, prefill + first sample
    seconds: float = 0.0  # wall time spent inside the loop

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


@dataclass
class Generation:
    tokens: list[list[int]]  # new token ids per row, <|endoftext|> excluded
    finish: list[str]  # per row: "eot" or "length"
    stats: Stats = field(default_factory=Stats)


class TokenStream:
    """Iterate to generate: each step yields, per row, the tokens it emitted in that step
    (one per step; several after a speculative verify step; none once the row finished, and
    <|endoftext|>, which finishes it, is not emitted).

    The next forward pass runs lazily at the next step, so a consumer sees every token as
    soon as it is sampled and no forward pass is wasted after the last one. With a
    ``drafter`` (``speculative.py``) each decode step verifies up to ``draft_tokens`` drafts.
    """

    def __init__(self, backend: Backend, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int, sampling: SamplingConfig,
                 generator: torch.Generator | None = None, overflow: str = "rebase",
                 stop_id: int | None = EOT_ID, drafter: Drafter | None = None,
                 draft_tokens: int = 4):
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        vocab = backend.config.vocab_size
        bad = next((t for p in prompts for t in p if not 0 <= int(t) < vocab), None)
        if bad is not None:  # else an IndexError deep in an embedding, or worse in a runtime
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        self.backend = backend
        self.window = backend.config.block_size
        self.keep = self.window if overflow == "slide" else max(1, self.window // 2)
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.generator = generator
        if generator is None and not sampling.is_greedy:
            self.generator = make_generator(None, backend.device)
        self.stop_id = stop_id
        self.drafter, self.draft_tokens = drafter, draft_tokens
        # every sampled token per row, also after the row finished: what the cache holds
        self.raw = [list(p[-self.window:]) for p in prompts]
        self.prompt_lens = [len(r) for r in self.raw]
        self.emitted = [0] * len(prompts)
        self.done = [False] * len(prompts)
        self.stats = Stats(prompt_tokens=sum(self.prompt_lens))
        self._state: State | None = None
        self._pending: torch.Tensor | None = None  # sampled, not yet fed: (B,)

    def __iter__(self) -> Iterator[list[list[int]]]:
        return self

    def __next__(self) -> list[list[int]]:
        if self._all_capped():
            raise StopIteration
        start = time.perf_counter()
        out = [self._emit(b, tokens) for b, tokens in enumerate(self._advance())]
        elapsed = time.perf_counter() - start
        self.stats.seconds += elapsed
        if self.stats.time_to_first_token is None:
            self.stats.time_to_first_token = elapsed
        return out

    @property
    def active(self) -> list[bool]:
        """Rows still emitting: not finished, not at max_new_tokens."""
        return [not (d or e >= self.max_new_tokens) for d, e in zip(self.done, self.emitted, strict=True)]

    def _all_capped(self) -> bool:
        return not any(self.active)

    def _emit(self, b: int, tokens: list[int]) -> list[int]:
        """Record row ``b``'s sampled tokens; -> those it emits (stop rules applied)."""
        self.raw[b].extend(tokens)
        out = []
        for tok in tokens:
            if self.done[b] or self.emitted[b] >= self.max_new_tokens:
                break
            if tok == self.stop_id:
                self.done[b] = True  # only <|endoftext|> finishes a row early
                break
            out.append(tok)
            self.emitted[b] += 1
        self.stats.new_tokens += len(out)
        return out

    @torch.inference_mode()
    def _advance(self) -> list[list[int]]:
        """One forward pass (prefill, decode, verify or overflow re-prefill) and its samples."""
        state = self._state
        if state is None or state.length >= self.window:
            # First step, or the window is full: (re-)prefill each row's last tokens, which
            # end with the token just sampled.
            rows = self.raw if state is None else [r[-self.keep:] for r in self.raw]
            ids, mask = left_pad(rows, self.backend.device)
            logits, state = self.backend.prefill(ids, mask)
            self.stats.prefills += 1
        else:
            drafts = self._drafts(state)
            if drafts is not None:
                return self._verify(state, drafts)
            logits, state = self.backend.decode(self._pending, state)
            self.stats.decodes += 1
        self._state = state
        self._pending = sample(logits, self.sampling, self.generator)
        return [[t] for t in self._pending.tolist()]

    def _drafts(self, state: State) -> torch.Tensor | None:
        """(B, K) drafts to verify after the pending token, or None for a plain decode."""
        k = min(self.draft_tokens, self.window - state.length - 1)
        if self.drafter is None or k <= 0:
            return None
        drafts = pad_drafts(self.drafter.propose(self.raw, k), self.active)
        if not drafts[0]:
            return None
        return torch.tensor(drafts, device=self.backend.device)

    def _verify(self, state: State, drafts: torch.Tensor) -> list[list[int]]:
        """Score the pending token and the drafts in one pass, keep what the rule accepts."""
        fed = torch.cat([self._pending.unsqueeze(1), drafts], dim=1)  # (B, 1 + K)
        logits, state = self.backend.score(fed, state)
        active = torch.tensor(self.active, device=logits.device)
        n, tokens = verify(logits, drafts, active, self.sampling, self.generator)
        K = drafts.size(1)
        if n < K:  # the rejected drafts leave the cache
            state = self.backend.rewind(state, state.length - (K - n))
        self.drafter.commit(n)
        rows = int(active.sum())
        self.stats.verify_steps += 1
        self.stats.drafted += K * rows
        self.stats.accepted += n * rows
        self._state, self._pending = state, tokens[:, -1]
        return tokens.tolist()

    def result(self) -> Generation:
        """The tokens generated so far (consume the stream first for the full result)."""
        tokens = [r[n:n + e] for r, n, e in zip(self.raw, self.prompt_lens, self.emitted, strict=True)]
        finish = ["eot" if d else "length" for d in self.done]
        return Generation(tokens=tokens, finish=finish, stats=self.stats)


def generate(backend: Backend, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingConfig, generator: torch.Generator | None = None,
             overflow: str = "rebase", stop_id: int | None = EOT_ID,
             drafter: Drafter | None = None, draft_tokens: int = 4) -> Generation:
    """Generate for a batch of token-id prompts; -> new tokens per row, finish reasons, stats.

    Runs on the backend's ``host_threads`` torch threads, if it names any (restored after).
    """
    stream = TokenStream(backend, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                         generator=generator, overflow=overflow, stop_id=stop_id,
                         drafter=drafter, draft_tokens=draft_tokens)
    with host_threads(backend):
        for _ in stream:
            pass
    return stream.result()


class TextDecoder:
    """Token ids -> text, incrementally: bytes of a character split across tokens are held
    back until the character is complete (an emoji is often 2-3 GPT-2 tokens)."""

    def __init__(self):
        self._enc = get_encoding()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._enc.decode_single_token_bytes(token))

    def flush(self) -> str:
        """Whatever is left (an incomplete sequence at the end becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
