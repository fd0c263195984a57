"""Model configuration and named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from slm_export.errors import SlmError


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257  # GPT-2 BPE
    block_size: int = 128  # context length: the model learns this many positions
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.1
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise SlmError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise SlmError(f"model config: {name} must be positive")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SlmError(f"model config has unknown fields: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, GPTConfig] = {
    # The TinyStories reference architecture: ~29.9M parameters (tied embeddings counted once).
    "30m": GPTConfig(),
    # Same vocabulary and context, small enough to learn visibly in minutes on 2 CPU cores.
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, dropout=0.0),
}


def preset(name: str) -> GPTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise SlmError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
