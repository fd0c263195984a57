"""Model and training configuration, the named presets and their training recipes.

Every default lives here once: ``GPTConfig`` for the architecture, ``TrainConfig`` for a run
(its defaults are the ``30m`` recipe), ``RECIPES`` for what another preset trains with.
"""

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


DEFAULT_PRESET = "30m"


def preset(name: str) -> GPTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise SlmError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The defaults are the 30m recipe (the TinyStories reference setup)."""

    dataset: str = "stories"
    text_field: str = "text"  # a column name, or a template such as "{Context}\n{Response}"
    stories: int = 10_000  # size of the embedded corpus, for dataset "stories"
    val_fraction: float = 0.005  # held out when the dataset has no validation split
    dataset_config: str | None = None  # the datasets builder config (load_dataset's name=)
    train_split: str = "train"
    val_split: str | None = None  # None: validation / val / valid / test, whichever exists
    streaming: bool = False  # read the source as a stream (corpora larger than memory)
    data_seed: int = 42  # the embedded corpus and the held-out split: the same documents every run
    data_root: str = "artifacts/data"
    out_dir: str = "artifacts/runs/30m-stories"
    max_iters: int = 20_000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup_iters: int = 1_000
    lr_decay_iters: int | None = None  # None: max_iters
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 500
    eval_iters: int = 100
    dtype: str = "auto"
    compile: bool = False
    device: str = "auto"
    seed: int = 42
    resume: bool = False
    init_from: str | None = None
    plots: bool = True

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.max_iters

    @property
    def schedule(self) -> dict:
        """The keyword arguments of ``optim.lr_at`` for this run."""
        return dict(lr=self.lr, min_lr=self.min_lr, warmup_iters=self.warmup_iters,
                    decay_iters=self.decay_iters)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise SlmError(f"training config has unknown fields: {sorted(unknown)}")
        return cls(**d)


# What each preset trains with, beyond TrainConfig's defaults (which are the 30m recipe). tiny is
# tuned to show learning within minutes on 2 CPU cores (small batch, higher LR, short warmup).
RECIPES: dict[str, dict] = {
    "30m": {},
    "tiny": dict(max_iters=300, batch_size=8, lr=2e-3, min_lr=2e-4, warmup_iters=20,
                 eval_interval=50, eval_iters=8),
}
# The fields a recipe sets (the columns of train.py's recipe table).
RECIPE_FIELDS = ("max_iters", "batch_size", "lr", "min_lr", "warmup_iters", "eval_interval",
                 "eval_iters")


def recipe(name: str) -> dict:
    """Every RECIPE_FIELDS value the preset ``name`` trains with."""
    preset(name)  # one-line error for an unknown name
    defaults = TrainConfig()
    return {k: RECIPES.get(name, {}).get(k, getattr(defaults, k)) for k in RECIPE_FIELDS}
