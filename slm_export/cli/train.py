"""`python train.py`: train the GPT on TinyStories, a local corpus or the embedded stories.

Run it under `torchrun --nproc_per_node N train.py ...` for DistributedDataParallel.
Hyperparameters left unset come from the preset's recipe (see the table below), or, with
--resume, from the run being resumed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from slm_export.cli.common import (
    ArgumentParser,
    entry_point,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed,
)
from slm_export.config import PRESETS, GPTConfig, preset
from slm_export.data import Source
from slm_export.errors import SlmError

# The recipe each preset trains with. 30m follows the TinyStories reference setup; tiny is
# tuned to show learning within minutes on 2 CPU cores (small batch, higher LR, short warmup).
RECIPES: dict[str, dict] = {
    "30m": dict(max_iters=20_000, batch_size=32, lr=5e-4, min_lr=5e-5, warmup_iters=1_000,
                eval_interval=500, eval_iters=100),
    "tiny": dict(max_iters=300, batch_size=8, lr=2e-3, min_lr=2e-4, warmup_iters=20,
                 eval_interval=50, eval_iters=8),
}
# Hyperparameters shared by every preset.
COMMON = dict(grad_accum=1, lr_decay_iters=None, weight_decay=0.1, grad_clip=1.0, dtype="auto",
              device="auto", seed=42, text_field="text", stories=10_000, val_fraction=0.005,
              data_root="artifacts/data")
TUNABLE = tuple(RECIPES["30m"]) + tuple(COMMON)
DEFAULT_PRESET = "30m"
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "dropout")


def _recipe_table() -> str:
    keys = list(RECIPES["30m"])
    rows = [f"  {'preset':<7}" + "".join(f"{k:>14}" for k in keys)]
    for name, r in RECIPES.items():
        rows.append(f"  {name:<7}" + "".join(f"{r[k]!s:>14}" for k in keys))
    return "preset recipes (defaults for flags left unset):\n" + "\n".join(rows)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train.py", description=__doc__, epilog=_recipe_table(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset",
                   help="'stories' (embedded offline corpus, default), a hub name such as "
                        "roneneldan/TinyStories, a local .txt/.jsonl/.parquet file or folder, "
                        "or a prepared data folder; with --resume, the resumed run's dataset")
    g.add_argument("--text-field", help="column holding the text, or a template like "
                                        "'{Context}\\n{Response}' (default text)")
    g.add_argument("--stories", type=positive_int,
                   help="number of embedded stories for --dataset stories (default 10000)")
    g.add_argument("--val-fraction", type=_fraction,
                   help="share of documents held out for validation when the dataset has no "
                        "validation split (default 0.005, the same documents every run)")
    g.add_argument("--data-root", help="where tokenized data is cached (default artifacts/data)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=list(PRESETS),
                   help="model architecture and training recipe (default 30m; with --resume, "
                        "the resumed run's architecture)")
    g.add_argument("--n-layer", type=positive_int, help="override the preset's layer count")
    g.add_argument("--n-head", type=positive_int, help="override the preset's head count")
    g.add_argument("--n-embd", type=positive_int, help="override the preset's width")
    g.add_argument("--block-size", type=positive_int, help="override the context length (128)")
    g.add_argument("--dropout", type=non_negative_float, help="override the preset's dropout")
    g = p.add_argument_group("optimization")
    g.add_argument("--max-iters", type=positive_int, help="optimizer steps in total")
    g.add_argument("--batch-size", type=positive_int, help="sequences per micro-batch (per process)")
    g.add_argument("--grad-accum", type=positive_int,
                   help="micro-batches accumulated per optimizer step (default 1)")
    g.add_argument("--lr", type=positive_float, help="peak learning rate")
    g.add_argument("--min-lr", type=non_negative_float,
                   help="floor of the cosine decay (must not exceed --lr)")
    g.add_argument("--warmup-iters", type=non_negative_int, help="linear warmup steps")
    g.add_argument("--lr-decay-iters", type=positive_int,
                   help="step where the cosine reaches --min-lr (default --max-iters)")
    g.add_argument("--weight-decay", type=non_negative_float,
                   help="AdamW decay on matrices and embeddings, not biases/LayerNorm (default 0.1)")
    g.add_argument("--grad-clip", type=non_negative_float,
                   help="clip the global gradient norm to this; 0 disables (default 1.0)")
    g.add_argument("--seed", type=seed, help="seed of weights, data order and eval batches (default 42)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-interval", type=positive_int,
                   help="evaluate, log metrics.jsonl and write ckpt.pt every this many steps")
    g.add_argument("--eval-iters", type=positive_int, help="batches per split per evaluation")
    g = p.add_argument_group("runtime")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 on GPUs that support it, else fp16 with a GradScaler; "
                        "fp32 on CPU (bf16 autocast on CPU on request)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    g = p.add_argument_group("run directory")
    g.add_argument("--out-dir", type=Path,
                   help="default artifacts/runs/<preset>-<dataset>; its parent gets a 'latest' "
                        "link to it")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir from its ckpt.pt")
    g.add_argument("--init-from", type=Path,
                   help="start from the weights of a checkpoint (ckpt.pt or best.pt), "
                        "with a fresh optimizer and step 0")
    g.add_argument("--no-plots", action="store_true", help="skip writing plots at the end")
    g.add_argument("--plots-only", type=Path, metavar="DIR",
                   help="only (re)draw the plots of the run in DIR, then exit")
    g.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    # Hidden: every process writes its parameter checksum here (the DDP sync test).
    p.add_argument("--param-checksum-dir", help=argparse.SUPPRESS)
    return p


def default_out_dir(preset_name: str, dataset: str) -> Path:
    name = "stories" if dataset == "stories" else Source(dataset=dataset).name
    return Path("artifacts/runs") / f"{preset_name}-{name}"


def resolve(args) -> tuple:
    """Flags -> (TrainConfig, GPTConfig): explicit flag > resumed run > preset recipe."""
    from slm_export import checkpoint
    from slm_export.training import TrainConfig

    if args.resume and args.init_from:
        raise SlmError("--resume and --init-from exclude each other")
    preset_name = args.preset or DEFAULT_PRESET
    dataset = args.dataset or "stories"
    out_dir = args.out_dir or default_out_dir(preset_name, dataset)
    values = {**COMMON, **RECIPES[preset_name]}
    base = preset(preset_name)
    if args.resume and (out_dir / "ckpt.pt").is_file():
        saved = checkpoint.load(out_dir / "ckpt.pt")
        values.update({k: v for k, v in saved.get("train_config", {}).items() if k in TUNABLE})
        dataset = args.dataset or saved.get("train_config", {}).get("dataset", dataset)
        if args.preset is None:  # the architecture of the run being resumed
            base = GPTConfig.from_dict(saved["model_config"])
    values.update({k: getattr(args, k) for k in TUNABLE if getattr(args, k) is not None})
    if values["min_lr"] > values["lr"]:
        raise SlmError(f"--min-lr ({values['min_lr']}) must not exceed --lr ({values['lr']})")
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    model_config = dataclasses.replace(base, **overrides)
    cfg = TrainConfig(dataset=dataset, out_dir=str(out_dir), compile=args.compile,
                      resume=args.resume,
                      init_from=str(args.init_from) if args.init_from else None,
                      plots=not args.no_plots, **values)
    return cfg, model_config


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quiet:  # datasets' progress bars too (the variable is read when it is imported)
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
    if args.plots_only is not None:
        from slm_export import plots

        written = plots.write_all(args.plots_only)
        print("\n".join(str(p) for p in written))
        return 0
    from slm_export.training import Interrupted, train

    cfg, model_config = resolve(args)
    try:
        result = train(cfg, model_config, progress=not args.quiet,
                       checksum_dir=args.param_checksum_dir)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    if result.metrics and not args.quiet:
        last = result.metrics[-1]
        print(f"done: step {result.step}, val loss {last['val_loss']:.4f}, best "
              f"{result.best_val_loss:.4f}; weights {result.out_dir / 'best.pt'}")
    return 0
