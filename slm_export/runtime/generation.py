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

from slm_export.runtime.base import Backend, State
from slm_export.runtime.sampling import SamplingConfig, make_generator, sample
from slm_export.tokenizer import EOT_ID, get_encoding

OVERFLOW_POLICIES = ("rebase", "slide")


@dataclass
class Stats:
    prefills: int = 0
    decodes: int = 0
    prompt_tokens: int = 0  # real tokens of the (cropped) prompts, all rows
    new_tokens: int = 0  # tokens emitted, all rows, <|endoftext|> excluded
    time_to_first_token: float | None = None  # seconds, prefill + first sample
    seconds: float = 0.0  # wall time spent inside the loop


@dataclass
class Generation:
    tokens: list[list[int]]  # new token ids per row, <|endoftext|> excluded
    finish: list[str]  # per row: "eot" or "length"
    stats: Stats = field(default_factory=Stats)


def left_pad(rows: Sequence[Sequence[int]], device: torch.device | str = "cpu",
             pad_id: int = EOT_ID) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token rows -> ids (B, T) int64 left-padded, and a (B, T) mask (None if all same length)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            ids[b, T - len(row):] = torch.as_tensor(row, dtype=torch.long)
            mask[b, T - len(row):] = 1
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


class TokenStream:
    """Iterate to generate: each step yields one entry per row, the new token id, or None
    for a row that has finished (the step that samples <|endoftext|> yields None too).

    The next forward pass runs lazily at the next step, so a consumer sees every token as
    soon as it is sampled and no forward pass is wasted after the last one.
    """

    def __init__(self, backend: Backend, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int, sampling: SamplingConfig,
                 generator: torch.Generator | None = None, overflow: str = "rebase",
                 stop_id: int | None = EOT_ID):
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
        self.history = [list(p[-self.window:]) for p in prompts]  # real tokens per row
        self.prompt_lens = [len(h) for h in self.history]
        self.done = [False] * len(prompts)
        self.stats = Stats(prompt_tokens=sum(len(h) for h in self.history))
        self.step = 0
        self._state: State | None = None
        self._tokens: torch.Tensor | None = None

    def __iter__(self) -> Iterator[list[int | None]]:
        return self

    def __next__(self) -> list[int | None]:
        if self.step >= self.max_new_tokens or all(self.done):
            raise StopIteration
        start = time.perf_counter()
        host = self._advance()
        out: list[int | None] = []
        for b, tok in enumerate(host):
            if self.done[b]:
                out.append(None)
            elif tok == self.stop_id:
                self.done[b] = True  # only <|endoftext|> finishes a row early
                out.append(None)
            else:
                self.history[b].append(tok)
                out.append(tok)
                self.stats.new_tokens += 1
        self.step += 1
        elapsed = time.perf_counter() - start
        self.stats.seconds += elapsed
        if self.stats.time_to_first_token is None:
            self.stats.time_to_first_token = elapsed
        return out

    @torch.inference_mode()
    def _advance(self) -> list[int]:
        """One forward pass (prefill, decode or overflow re-prefill) and one sample."""
        state = self._state
        if state is None or state.length >= self.window:
            # First step, or the window is full: (re-)prefill each row's last tokens.
            # Each row's history already ends with the token just sampled.
            rows = self.history if state is None else [h[-self.keep:] for h in self.history]
            ids, mask = left_pad(rows, self.backend.device)
            logits, state = self.backend.prefill(ids, mask)
            self.stats.prefills += 1
        else:
            logits, state = self.backend.decode(self._tokens, state)
            self.stats.decodes += 1
        self._state = state
        self._tokens = sample(logits, self.sampling, self.generator)
        return self._tokens.tolist()

    def result(self) -> Generation:
        """The tokens generated so far (consume the stream first for the full result)."""
        tokens = [h[n:] for h, n in zip(self.history, self.prompt_lens, strict=True)]
        finish = ["eot" if d else "length" for d in self.done]
        return Generation(tokens=tokens, finish=finish, stats=self.stats)


def generate(backend: Backend, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingConfig, generator: torch.Generator | None = None,
             overflow: str = "rebase", stop_id: int | None = EOT_ID) -> Generation:
    """Generate for a batch of token-id prompts; -> new tokens per row, finish reasons, stats."""
    stream = TokenStream(backend, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                         generator=generator, overflow=overflow, stop_id=stop_id)
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


def stream_text(backend: Backend, prompt: Sequence[int], *, max_new_tokens: int,
                sampling: SamplingConfig, generator: torch.Generator | None = None,
                overflow: str = "rebase") -> Iterator[str]:
    """Generate for one prompt and yield the continuation as text pieces, as they form."""
    stream = TokenStream(backend, [prompt], max_new_tokens=max_new_tokens, sampling=sampling,
                         generator=generator, overflow=overflow)
    decoder = TextDecoder()
    for (token,) in stream:
        if token is not None:
            piece = decoder.push(token)
            if piece:
                yield piece
    tail = decoder.flush()
    if tail:
        yield tail
