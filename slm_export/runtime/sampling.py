"""Pure sampling helpers, applied to last-position logits (B, V) only.

``sample`` is the one function the generation loop calls. With ``top_k`` it samples from
the k largest logits only (``torch.topk`` then a softmax over k values, not over the whole
vocabulary); ``probabilities`` spells out the same distribution over the full vocabulary
for tests and inspection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 or greedy=True: argmax. top_k >= vocab or None: no top-k cut.
    top_p None or 1.0: no nucleus cut."""

    temperature: float = 0.8
    top_k: int | None = 20
    top_p: float | None = None
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


GREEDY = SamplingConfig(temperature=0.0, top_k=None, greedy=True)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of its own, so sampling never touches (or depends on) the global RNG."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature if temperature != 1.0 else logits


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p.

    A token is dropped when the tokens ranked above it already hold >= p of the mass, so
    the most likely token always stays. Works on logits in any order (a top-k subset too).
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_above = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_above >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _candidates(logits: torch.Tensor, cfg: SamplingConfig):
    """-> (filtered logits of the candidates, their token ids or None for the full vocab)."""
    logits = apply_temperature(logits.float(), cfg.temperature)
    ids = None
    if cfg.top_k is not None and cfg.top_k < logits.size(-1):
        logits, ids = torch.topk(logits, cfg.top_k, dim=-1)  # (B, k), sorted
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    return logits, ids


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The (B, V) distribution ``sample`` draws from (one-hot at the argmax when greedy)."""
    if cfg.is_greedy:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(
            -1, logits.argmax(-1, keepdim=True), 1.0)
    cand, ids = _candidates(logits, cfg)
    probs = torch.softmax(cand, dim=-1)
    if ids is None:
        return probs
    return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, ids, probs)


def sample(logits: torch.Tensor, cfg: SamplingConfig,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,) int64, on the logits' device."""
    if cfg.is_greedy:
        return logits.argmax(dim=-1)
    cand, ids = _candidates(logits, cfg)
    probs = torch.softmax(cand, dim=-1)
    choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    if ids is not None:
        choice = ids.gather(-1, choice)
    return choice.squeeze(-1)
