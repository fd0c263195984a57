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

from slm_export import plots
from slm_export.cli.common import (
    ArgumentParser,
    device,
    entry_point,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed,
)
from slm_export.config import (
    DEFAULT_PRESET,
    PRESETS,
    RECIPE_FIELDS,
    GPTConfig,
    TrainConfig,
    preset,
    recipe,
)
from slm_export.data import Source
from slm_export.errors import SlmError
from slm_export.training import Interrupted, load_resume, train

# Set by this invocation's flags alone (--dataset falls back to the resumed run's, below);
# every other TrainConfig field is tunable: flag > resumed run > preset recipe.
PER_RUN = ("dataset", "out_dir", "compile", "resume", "init_from", "plots")
TUNABLE = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in PER_RUN)
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "dropout")
D = TrainConfig()  # the defaults, for the help text


def _recipe_table() -> str:
    rows = [f"  {'preset':<7}" + "".join(f"{k:>14}" for k in RECIPE_FIELDS)]
    for name in PRESETS:
        r = recipe(name)
        rows.append(f"  {name:<7}" + "".join(f"{r[k]!s:>14}" for k in RECIPE_FIELDS))
    return "preset recipes (defaults for flags left unset):\n" + "\n".join(rows)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train.py", description=__doc__, epilog=_recipe_table(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _data_flags(p.add_argument_group("data"))
    _model_flags(p.add_argument_group("model"))
    _optimization_flags(p.add_argument_group("optimization"))
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-interval", type=positive_int,
                   help="evaluate, log metrics.jsonl and write ckpt.pt every this many steps")
    g.add_argument("--eval-iters", type=positive_int, help="batches per split per evaluation")
    g = p.add_argument_group("runtime")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 on GPUs with native bf16 (compute capability >= 8.0), else "
                        "fp16 with a GradScaler; fp32 on CPU (bf16 autocast on CPU on request)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", type=device, help=f"auto, cpu, cuda or cuda:N (default {D.device})")
    _run_dir_flags(p.add_argument_group("run directory"))
    return p


def _data_flags(g) -> None:
    g.add_argument("--dataset",
                   help=f"'{D.dataset}' (embedded offline corpus, default), a hub name such as "
                        "roneneldan/TinyStories, a local .txt/.jsonl/.parquet file or folder, "
                        "or a prepared data folder; with --resume, the resumed run's dataset")
    g.add_argument("--text-field", help="column holding the text, or a template like "
                                        f"'{{Context}}\\n{{Response}}' (default {D.text_field})")
    g.add_argument("--stories", type=positive_int,
                   help=f"number of embedded stories for --dataset stories (default {D.stories})")
    g.add_argument("--val-fraction", type=fraction,
                   help="share of documents held out for validation when the dataset has no "
                        f"validation split (default {D.val_fraction}, the same documents every run)")
    g.add_argument("--dataset-config", help="the dataset's builder config (load_dataset's name=)")
    g.add_argument("--train-split", help=f"split to train on (default {D.train_split})")
    g.add_argument("--val-split", help="split to evaluate on (default: validation, val, valid "
                                       "or test, whichever exists; else --val-fraction is held out)")
    g.add_argument("--streaming", action="store_true", default=None,
                   help="read the dataset as a stream (corpora larger than memory), tokenized "
                        "once into the memmaps")
    g.add_argument("--data-seed", type=seed,
                   help=f"seed of the embedded stories and of the held-out split (default {D.data_seed})")
    g.add_argument("--data-root", help=f"where tokenized data is cached (default {D.data_root})")


def _model_flags(g) -> None:
    g.add_argument("--preset", choices=list(PRESETS),
                   help=f"model architecture and training recipe (default {DEFAULT_PRESET}; "
                        "with --resume, the resumed run's architecture)")
    g.add_argument("--n-layer", type=positive_int, help="override the preset's layer count")
    g.add_argument("--n-head", type=positive_int, help="override the preset's head count")
    g.add_argument("--n-embd", type=positive_int, help="override the preset's width")
    g.add_argument("--block-size", type=positive_int,
                   help=f"override the context length ({GPTConfig.block_size})")
    g.add_argument("--dropout", type=non_negative_float, help="override the preset's dropout")


def _optimization_flags(g) -> None:
    g.add_argument("--max-iters", type=positive_int, help="optimizer steps in total")
    g.add_argument("--batch-size", type=positive_int, help="sequences per micro-batch (per process)")
    g.add_argument("--grad-accum", type=positive_int,
                   help=f"micro-batches accumulated per optimizer step (default {D.grad_accum})")
    g.add_argument("--lr", type=positive_float, help="peak learning rate")
    g.add_argument("--min-lr", type=non_negative_float,
                   help="floor of the cosine decay (must not exceed --lr)")
    g.add_argument("--warmup-iters", type=non_negative_int, help="linear warmup steps")
    g.add_argument("--lr-decay-iters", type=positive_int,
                   help="step where the cosine reaches --min-lr (default --max-iters)")
    g.add_argument("--weight-decay", type=non_negative_float,
                   help="AdamW decay on matrices and embeddings, not biases/LayerNorm "
                        f"(default {D.weight_decay})")
    g.add_argument("--grad-clip", type=non_negative_float,
                   help=f"clip the global gradient norm to this; 0 disables (default {D.grad_clip})")
    g.add_argument("--seed", type=seed,
                   help=f"seed of weights, data order and eval batches (default {D.seed})")


def _run_dir_flags(g) -> None:
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


def default_out_dir(preset_name: str, dataset: str) -> Path:
    name = "stories" if dataset == "stories" else Source.of(dataset=dataset).name
    return Path("artifacts/runs") / f"{preset_name}-{name}"


def resolve(args) -> tuple[TrainConfig, GPTConfig, dict | None]:
    """Flags -> (TrainConfig, GPTConfig, the resumed run's ckpt.pt or None):
    explicit flag > resumed run > preset recipe. ckpt.pt is loaded here, once."""
    if args.resume and args.init_from:
        raise SlmError("--resume and --init-from exclude each other")
    preset_name = args.preset or DEFAULT_PRESET
    out_dir = args.out_dir or default_out_dir(preset_name, args.dataset or D.dataset)
    saved = load_resume(out_dir) if args.resume else None
    saved_cfg = saved.get("train_config", {}) if saved else {}
    values = recipe(preset_name)
    values.update({k: v for k, v in saved_cfg.items() if k in TUNABLE})
    values.update({k: getattr(args, k) for k in TUNABLE if getattr(args, k) is not None})
    if values["min_lr"] > values["lr"]:
        raise SlmError(f"--min-lr ({values['min_lr']}) must not exceed --lr ({values['lr']})")
    # the architecture of the run being resumed, unless --preset names one
    base = GPTConfig.from_dict(saved["model_config"]) if saved and not args.preset \
        else preset(preset_name)
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    cfg = TrainConfig(dataset=args.dataset or saved_cfg.get("dataset", D.dataset),
                      out_dir=str(out_dir), compile=args.compile, resume=args.resume,
                      init_from=str(args.init_from) if args.init_from else None,
                      plots=not args.no_plots, **values)
    return cfg, dataclasses.replace(base, **overrides), saved


class ConsoleReporter:
    """The trainer's Reporter on a terminal: a rich progress bar and one line per evaluation on
    stdout (neither with --quiet); warnings on stderr, always."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._bar = None
        self._task = None

    def start(self, total: int, done: int) -> None:
        if self.quiet:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                             TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                             TextColumn("ETA"), TimeRemainingColumn())
        self._task = self._bar.add_task("train", total=total, completed=done, info="")
        self._bar.start()

    def progress(self, step: int, info: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)

    def log(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, soft_wrap=True)
        elif not self.quiet:
            print(line, flush=True)

    def warn(self, line: str) -> None:
        print(f"warning: {line}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quiet:  # datasets' progress bars too (the variable is read when it is imported)
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
    if args.plots_only is not None:
        written = plots.write_all(args.plots_only, warn=ConsoleReporter().warn)
        print("\n".join(str(p) for p in written))
        return 0
    cfg, model_config, saved = resolve(args)
    try:
        result = train(cfg, model_config, reporter=ConsoleReporter(quiet=args.quiet), resume=saved)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    if result.metrics and not args.quiet:
        last = result.metrics[-1]
        print(f"done: step {result.step}, val loss {last['val_loss']:.4f}, best "
              f"{result.best_val_loss:.4f}; weights {result.out_dir / 'best.pt'}")
        if cfg.plots and (result.out_dir / "plots" / "summary.png").is_file():
            print(f"plots: {result.out_dir / 'plots'} (summary.png: the run at a glance)")
    return 0
