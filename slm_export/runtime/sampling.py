"""Pure sampling helpers, applied to next-token logits (N, V).

``adjust`` applies a row's history-dependent controls (repetition, frequency and presence
penalties, logit bias); ``sample`` draws from what is left after temperature, top-k, top-p
and min-p. The generation loop calls both, with each row's own ``SamplingConfig``;
``probabilities`` spells out the distribution ``sample`` draws from over the full vocabulary
(speculative verification and tests). With ``top_k`` sampling draws from the k largest
logits only (``torch.topk`` then a softmax over k values, not over the whole vocabulary).

The controls follow what OpenAI's API and vLLM mean by them: presence and frequency
penalties count the tokens generated so far (``counts``); the repetition penalty (CTRL's,
as in transformers) applies to every token seen, prompt included (``seen``): positive
logits are divided by it, negative ones multiplied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 or greedy=True: argmax (of the adjusted logits). top_k >= vocab or None:
    no top-k cut. top_p None or 1.0: no nucleus cut. min_p None or 0: no min-p cut.
    ``logit_bias``: (token id, bias) pairs added to the logits."""

    temperature: float = 0.8
    top_k: int | None = 20
    top_p: float | None = None
    greedy: bool = False
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for token, bias in self.logit_bias:
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias of token {token} must be in [-100, 100], got {bias}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    @property
    def uses_history(self) -> bool:
        """Whether ``adjust`` needs the row's token counts."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def adjusts(self) -> bool:
        return self.uses_history or bool(self.logit_bias)


GREEDY = SamplingConfig(temperature=0.0, top_k=None, greedy=True)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of its own, so sampling never touches (or depends on) the global RNG."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def adjust(logits: torch.Tensor, cfg: SamplingConfig, counts: torch.Tensor | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """``logits`` (..., V) with the history controls applied: ``counts`` (..., V) how often
    each token was generated, ``seen`` (..., V) bool whether it occurred at all (prompt
    included); both may be None when ``cfg.uses_history`` is False."""
    if not cfg.adjusts:
        return logits
    out = logits.float().clone()
    if cfg.repetition_penalty != 1:
        penalized = torch.where(out > 0, out / cfg.repetition_penalty, out * cfg.repetition_penalty)
        out = torch.where(seen, penalized, out)
    if cfg.frequency_penalty:
        out -= cfg.frequency_penalty * counts
    if cfg.presence_penalty:
        out -= cfg.presence_penalty * (counts > 0).float()
    if cfg.logit_bias:
        ids = torch.tensor([t for t, _ in cfg.logit_bias], device=out.device)
        out[..., ids] += torch.tensor([b for _, b in cfg.logit_bias], device=out.device)
    return out


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


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop the tokens whose probability is below ``p`` times the most likely one's."""
    if not p:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < p * probs.amax(-1, keepdim=True), float("-inf"))


def _candidates(logits: torch.Tensor, cfg: SamplingConfig):
    """-> (filtered logits of the candidates, their token ids or None for the full vocab)."""
    logits = apply_temperature(logits.float(), cfg.temperature)
    ids = None
    if cfg.top_k is not None and cfg.top_k < logits.size(-1):
        logits, ids = torch.topk(logits, cfg.top_k, dim=-1)  # (N, k), sorted
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.min_p:
        logits = min_p_filter(logits, cfg.min_p)
    return logits, ids


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The (N, V) distribution ``sample`` draws from (one-hot at the argmax when greedy)."""
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
    """logits (N, V) -> next token ids (N,) int64, on the logits' device."""
    if cfg.is_greedy:
        return logits.argmax(dim=-1)
    cand, ids = _candidates(logits, cfg)
    probs = torch.softmax(cand, dim=-1)
    choice = torch.multinomial(probs, 1, generator=generator)  # (N, 1)
    if ids is not None:
        choice = ids.gather(-1, choice)
    return choice.squeeze(-1)
