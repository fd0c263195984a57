"""The one generation loop every backend shares, for a fixed batch and for rows that come
and go (continuous batching).

``TokenStream`` drives a backend: rows join (``add``: prefilled together at the next step,
then merged into the running batch), each step feeds every row's pending token (or verifies
drafts, ``speculative.py``), samples with each row's own ``SamplingConfig`` and generator,
and rows leave the batch at the next step once they end (``<|endoftext|>``, their
``max_new_tokens``, or ``finish`` for a stop string or a client gone). Context overflow is
per row and the same for every backend:

- ``"rebase"`` (default): when a row's window (``block_size`` learned positions) is full, its
  last half is re-prefilled alone and merged back: about one prefill per ``block_size // 2``
  new tokens; the other rows only lose the left padding they no longer need.
- ``"slide"``: once a row's window is full it re-prefills its last ``block_size`` tokens at
  every step (nanoGPT's ``idx[:, -block_size:]`` semantics; exact, but a full forward per token).

Prompts longer than the window are cropped to their last ``block_size`` tokens. Rows of
different lengths share a batch by left padding; a row's positions count its real tokens
only, so every row gets the tokens it would get alone.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from slm_export.runtime.base import Backend, State, host_threads, left_pad
from slm_export.runtime.sampling import SamplingConfig, adjust, make_generator, sample
from slm_export.runtime.speculative import Drafter, accepted_runs, pad_drafts, tokens_at
from slm_export.tokenizer import EOT_ID

OVERFLOW_POLICIES = ("rebase", "slide")


@dataclass
class Stats:
    prefills: int = 0  # prefill calls (a batch of joiners, or one overflow re-prefill, is one)
    decodes: int = 0
    verify_steps: int = 0  # speculative forward passes (each scores 1 + K tokens per row)
    drafted: int = 0  # draft tokens scored, all rows
    accepted: int = 0  # of them kept
    prompt_tokens: int = 0  # real tokens of the (cropped) prompts, all rows
    new_tokens: int = 0  # tokens emitted, all rows, <|endoftext|> excluded
    time_to_first_token: float | None = None  # seconds, the first step (prefill + first sample)
    seconds: float = 0.0  # wall time spent inside the loop

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


@dataclass
class Generation:
    tokens: list[list[int]]  # new token ids per row, <|endoftext|> excluded
    finish: list[str]  # per row: "eot", "length", "stop" or "cancelled"
    stats: Stats = field(default_factory=Stats)


@dataclass(eq=False)
class Row:
    """One row of the stream: every token its window has seen (the cropped prompt, then each
    sampled token), and how it samples and ends."""

    id: int
    tokens: list[int]
    prompt_len: int
    max_new_tokens: int
    sampling: SamplingConfig
    generator: torch.Generator | None
    stop_id: int | None
    emitted: int = 0
    finish: str | None = None  # set once the row ends
    fed: int = 0  # of ``tokens`` in the backend's window (the last one is pending until fed)
    counts: torch.Tensor | None = None  # (V,) generated-token counts, for the penalties
    seen: torch.Tensor | None = None  # (V,) bool: in the prompt or generated

    @property
    def new_tokens(self) -> list[int]:
        return self.tokens[self.prompt_len:self.prompt_len + self.emitted]


class TokenStream:
    """Iterate to generate: each step yields {row id: the tokens it emitted in that step} for
    every row that took part (one token per step; several after a speculative verify step;
    none in the step a row ends at <|endoftext|>, which is not emitted).

    The next forward pass runs lazily at the next step, so a consumer sees every token as
    soon as it is sampled and no forward pass is wasted after the last one. With a
    ``drafter`` each step verifies up to ``draft_tokens`` drafts. The loop runs under the
    backend's ``host_threads`` while it has rows, and restores torch's count when it runs
    dry (or on ``close``).
    """

    def __init__(self, backend: Backend, prompts: Sequence[Sequence[int]] = (), *,
                 max_new_tokens: int = 200, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None, overflow: str = "rebase",
                 stop_id: int | None = EOT_ID, drafter: Drafter | None = None,
                 draft_tokens: int = 4):
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        self.backend = backend
        self.window = backend.config.block_size
        self.keep = self.window if overflow == "slide" else max(1, self.window // 2)
        self.drafter, self.draft_tokens = drafter, draft_tokens
        self.rows: dict[int, Row] = {}
        self.stats = Stats()
        self._ids = itertools.count()
        self._order: list[Row] = []  # the rows in the backend's state, in its row order
        self._joining: list[Row] = []
        self._state: State | None = None
        self._threads: contextlib.ExitStack | None = None
        if prompts:
            self.add(prompts, max_new_tokens=max_new_tokens, sampling=sampling, generator=generator,
                     stop_id=stop_id)

    # -- rows come and go ------------------------------------------------------------------

    def add(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
            sampling: SamplingConfig | None = None, generator: torch.Generator | None = None,
            stop_id: int | None = EOT_ID) -> list[int]:
        """New rows, prefilled together at the next step; -> their ids. Rows added in one call
        sample with one ``sampling`` and draw from one ``generator`` (a seeded generator
        gives the same text for the same rows, whatever else runs)."""
        vocab = self.backend.config.vocab_size
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        bad = next((t for p in prompts for t in p if not 0 <= int(t) < vocab), None)
        if bad is not None:  # else an IndexError deep in an embedding, or worse in a runtime
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        sampling = sampling or SamplingConfig()
        if generator is None and not sampling.is_greedy:
            generator = make_generator(None, self.backend.device)
        ids = []
        for prompt in prompts:
            tokens = [int(t) for t in prompt[-self.window:]]
            row = Row(next(self._ids), tokens, len(tokens), max_new_tokens, sampling, generator, stop_id)
            if sampling.uses_history:
                row.counts = torch.zeros(vocab, device=self.backend.device)
                row.seen = torch.zeros(vocab, dtype=torch.bool, device=self.backend.device)
                row.seen[torch.tensor(tokens, device=self.backend.device)] = True
            self.rows[row.id] = row
            self._joining.append(row)
            self.stats.prompt_tokens += len(tokens)
            ids.append(row.id)
        return ids

    def finish(self, row_id: int, reason: str = "stop") -> None:
        """End a row now (a stop string matched, a client left): it emits nothing more and
        leaves the batch at the next step."""
        row = self.rows[row_id]
        if row.finish is None:
            row.finish = reason

    @property
    def live(self) -> list[int]:
        """Ids of the rows still generating."""
        return [r.id for r in (*self._order, *self._joining) if r.finish is None]

    @property
    def batch(self) -> list[int]:
        """Ids of the rows in the backend's state, in its row order (after the last step)."""
        return [r.id for r in self._order]

    def forget(self, row_id: int) -> None:
        """Drop an ended row's record (a server's rows come and go; a batch keeps them)."""
        if self.rows[row_id].finish is None:
            raise ValueError(f"row {row_id} has not ended")
        del self.rows[row_id]

    # -- the steps -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[int, list[int]]]:
        return self

    def __next__(self) -> dict[int, list[int]]:
        if not self.live:
            self.close()
            raise StopIteration
        return self.step()

    def step(self) -> dict[int, list[int]]:
        """One step of every live row (joiners prefilled); {} when no row is live."""
        if not self.live:
            self.close()
            return {}
        if self._threads is None:
            self._threads = contextlib.ExitStack()
            self._threads.enter_context(host_threads(self.backend))
        start = time.perf_counter()
        with torch.inference_mode():
            out = self._advance()
        elapsed = time.perf_counter() - start
        self.stats.seconds += elapsed
        if self.stats.time_to_first_token is None:
            self.stats.time_to_first_token = elapsed
        return out

    def close(self) -> None:
        """Restore torch's thread count (the stream may be stepped again later)."""
        if self._threads is not None:
            self._threads.close()
            self._threads = None

    def _advance(self) -> dict[int, list[int]]:
        self._leave()
        out: dict[int, list[int]] = {}
        parts: list[tuple[State, list[Row]]] = []
        if self._order:
            full = [i for i, r in enumerate(self._order) if r.fed >= self.window]
            rest = [i for i, r in enumerate(self._order) if r.fed < self.window]
            state, rows = self._state, [self._order[i] for i in rest]
            if full:  # per-row overflow: the full rows re-prefill alone, the rest compact
                state = self.backend.select(state, rest) if rest else None
            if rows:
                parts.append((self._step(state, rows, out, speculate=not full), rows))
            if full:
                again = [self._order[i] for i in full]
                parts.append(self._prefill(again, [r.tokens[-self.keep:] for r in again], out))
                if self.drafter is not None:  # its rows in the batch's new order
                    self.drafter.keep(rest + full)
        if self._joining:
            joining, self._joining = self._joining, []
            parts.append(self._prefill(joining, [r.tokens for r in joining], out))
            if self.drafter is not None:
                self.drafter.reset()  # it starts again from the rows' histories
        self._state = self.backend.merge([s for s, _ in parts])
        self._order = [r for _, rows in parts for r in rows]
        return out

    def _leave(self) -> None:
        """Rows that ended leave the running batch (and the drafter's)."""
        kept = [i for i, r in enumerate(self._order) if r.finish is None]
        if len(kept) == len(self._order):
            return
        if self.drafter is not None:
            self.drafter.keep(kept)
        self._state = self.backend.select(self._state, kept) if kept else None
        self._order = [self._order[i] for i in kept]

    def _prefill(self, rows: list[Row], windows: list[list[int]], out) -> tuple[State, list[Row]]:
        ids, mask = left_pad(windows, self.backend.device)
        logits, state = self.backend.prefill(ids, mask)
        self.stats.prefills += 1
        for r, w in zip(rows, windows, strict=True):
            r.fed = len(w)
        for r, t in zip(rows, self._pick(logits, rows), strict=True):
            out[r.id] = self._emit(r, [t])
        return state, rows

    def _step(self, state: State, rows: list[Row], out, speculate: bool = True) -> State:
        """A decode (or verify) step of the running ``rows``."""
        pending = torch.tensor([r.tokens[-1] for r in rows], device=self.backend.device)
        drafts = self._drafts(state, rows) if speculate else None
        if drafts is not None:
            return self._verify(state, rows, pending, drafts, out)
        logits, state = self.backend.forward(pending, state)
        self.stats.decodes += 1
        for r, t in zip(rows, self._pick(logits, rows), strict=True):
            r.fed += 1
            out[r.id] = self._emit(r, [t])
        return state

    def _groups(self, rows: list[Row]):
        """(row positions, sampling, generator) of the rows that sample alike, in order."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault((id(r.sampling), id(r.generator)), []).append(i)
        return [(index, rows[index[0]].sampling, rows[index[0]].generator) for index in groups.values()]

    def _pick(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        """The next token of each row from its (B, V) logits."""
        groups = self._groups(rows)
        if len(groups) == 1 and not groups[0][1].adjusts:
            return sample(logits, groups[0][1], groups[0][2]).tolist()
        picked = [0] * len(rows)
        for index, cfg, gen in groups:
            chosen = sample(self._adjusted(logits[index], [rows[i] for i in index], cfg), cfg, gen)
            for i, t in zip(index, chosen.tolist(), strict=True):
                picked[i] = t
        return picked

    @staticmethod
    def _adjusted(logits: torch.Tensor, rows: list[Row], cfg: SamplingConfig,
                  drafts: torch.Tensor | None = None) -> torch.Tensor:
        """``adjust`` with the rows' histories; with ``drafts`` (b, K), logits (b, K + 1, V)
        whose position j counts the first j drafts as generated (what verifying needs)."""
        if not cfg.uses_history:
            return adjust(logits, cfg)
        counts = torch.stack([r.counts for r in rows])
        seen = torch.stack([r.seen for r in rows])
        if drafts is not None:
            V = logits.size(-1)
            hot = torch.nn.functional.one_hot(drafts, V).float().cumsum(1)  # (b, K, V)
            counts = torch.cat([counts[:, None], counts[:, None] + hot], dim=1)
            seen = seen[:, None] | (counts > 0)
        return adjust(logits, cfg, counts, seen)

    def _emit(self, row: Row, tokens: list[int]) -> list[int]:
        """Record ``row``'s sampled tokens; -> those it emits (stop rules applied)."""
        row.tokens.extend(tokens)
        out = []
        for tok in tokens:
            if row.finish is not None:
                break
            if tok == row.stop_id:
                row.finish = "eot"  # only <|endoftext|> finishes a row early
                break
            out.append(tok)
            row.emitted += 1
            if row.counts is not None:
                row.counts[tok] += 1
                row.seen[tok] = True
            if row.emitted >= row.max_new_tokens:
                row.finish = "length"
        self.stats.new_tokens += len(out)
        return out

    # -- speculative decoding ----------------------------------------------------------------

    def _drafts(self, state: State, rows: list[Row]) -> torch.Tensor | None:
        """(B, K) drafts to verify after the pending tokens, or None for a plain decode."""
        k = min(self.draft_tokens, self.window - state.length - 1)
        if self.drafter is None or k <= 0:
            return None
        drafts = pad_drafts(self.drafter.propose([r.tokens for r in rows], k))
        if not drafts[0]:
            return None
        return torch.tensor(drafts, device=self.backend.device)

    def _verify(self, state: State, rows: list[Row], pending: torch.Tensor,
                drafts: torch.Tensor, out) -> State:
        """Score the pending tokens and the drafts in one pass, keep what the rule accepts:
        the prefix of drafts every row accepted, then each row's own token."""
        fed = torch.cat([pending.unsqueeze(1), drafts], dim=1)  # (B, 1 + K)
        logits, state = self.backend.forward(fed, state, every=True)
        K = drafts.size(1)
        groups = [(index, cfg, gen, self._adjusted(logits[index], [rows[i] for i in index], cfg,
                                                   drafts[index]))
                  for index, cfg, gen in self._groups(rows)]
        runs = [accepted_runs(adj, drafts[index], cfg, gen) for index, cfg, gen, adj in groups]
        n = min(int(run.min()) for run, _ in runs)
        if n < K:  # the rejected drafts leave the cache
            state = self.backend.rewind(state, state.length - (K - n))
        self.drafter.commit(n)
        for (index, cfg, gen, _), (run, scored) in zip(groups, runs, strict=True):
            tokens = tokens_at(n, scored, drafts[index], run, cfg, gen)
            for i, row_tokens in zip(index, tokens.tolist(), strict=True):
                rows[i].fed += 1 + n
                out[rows[i].id] = self._emit(rows[i], row_tokens)
        self.stats.verify_steps += 1
        self.stats.drafted += K * len(rows)
        self.stats.accepted += n * len(rows)
        return state

    def result(self) -> Generation:
        """The tokens generated so far, rows in the order they were added (consume the stream
        first for the full result)."""
        rows = list(self.rows.values())
        return Generation(tokens=[r.new_tokens for r in rows],
                          finish=[r.finish or "length" for r in rows], stats=self.stats)


def generate(backend: Backend, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingConfig, generator: torch.Generator | None = None,
             overflow: str = "rebase", stop_id: int | None = EOT_ID,
             drafter: Drafter | None = None, draft_tokens: int = 4) -> Generation:
    """Generate for a batch of token-id prompts; -> new tokens per row, finish reasons, stats."""
    stream = TokenStream(backend, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                         generator=generator, overflow=overflow, stop_id=stop_id,
                         drafter=drafter, draft_tokens=draft_tokens)
    for _ in stream:
        pass
    return stream.result()
