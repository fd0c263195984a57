"""The training loop: mixed precision, gradient accumulation, evaluation, checkpoints, resume, DDP.

One ``TrainConfig`` describes a run. ``train(cfg, model_config)`` runs it in this process;
under ``torchrun`` every process runs it and they form a DistributedDataParallel group
(rank 0 alone prints and writes files). A run directory holds
- ``ckpt.pt`` (kind "train", written at every evaluation): everything needed to continue,
  including the data generator's state, so a resumed run replays the same batches;
- ``best.pt`` (kind "weights"): the weights with the lowest validation loss so far;
- ``metrics.jsonl``: one JSON line per evaluation; ``plots/*.png`` at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from slm_export import checkpoint, optim
from slm_export.config import GPTConfig
from slm_export.data import Source, TokenData, get_batch, prepare
from slm_export.devices import resolve_device
from slm_export.errors import SlmError, first_line
from slm_export.model import GPT

EVAL_SEED_OFFSET = 1_000_003  # eval batches come from their own generator: seed + this


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "stories"
    text_field: str = "text"
    stories: int = 10_000
    val_fraction: float = 0.005  # held out when the dataset has no validation split
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

    def lr_at(self, step: int) -> float:
        return optim.lr_at(step, lr=self.lr, min_lr=self.min_lr, warmup_iters=self.warmup_iters,
                           decay_iters=self.decay_iters)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# -- precision -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    use_scaler: bool  # fp16 gradients need loss scaling; bf16 and fp32 do not

    def autocast(self, device_type: str):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.dtype)


def select_precision(device_type: str, requested: str = "auto",
                     bf16_supported: bool = False) -> Precision:
    """auto: bf16 autocast on a GPU that supports it, else fp16 + GradScaler; fp32 on CPU.

    An explicit request wins where it can work: bf16 on CPU is allowed (autocast supports it),
    fp16 needs CUDA, bf16 on a GPU without bf16 is refused.
    """
    cuda = device_type == "cuda"
    if requested == "auto":
        if not cuda:
            return Precision(torch.float32, False)
        requested = "bf16" if bf16_supported else "fp16"
    if requested == "fp32":
        return Precision(torch.float32, False)
    if requested == "bf16":
        if cuda and not bf16_supported:
            raise SlmError("--dtype bf16: this GPU does not support bfloat16; use fp16 or fp32")
        return Precision(torch.bfloat16, False)
    if requested == "fp16":
        if not cuda:
            raise SlmError("--dtype fp16 needs a CUDA device; on CPU use bf16 or fp32")
        return Precision(torch.float16, True)
    raise SlmError(f"unknown dtype {requested!r}; use auto, fp32, bf16 or fp16")


# -- distributed -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(), resolve_device(device_name)
    import torch.distributed as dist

    d = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)),
             int(os.environ["WORLD_SIZE"]))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device


def _barrier(d: Dist) -> None:
    if d.enabled:
        torch.distributed.barrier()


# -- the pieces of a step --------------------------------------------------------------------

def forward_backward(model, micro_batches, precision: Precision, device_type: str,
                     scaler: torch.amp.GradScaler | None = None, ddp: bool = False) -> float:
    """Accumulate gradients over K micro-batches; returns the mean loss.

    Each loss is divided by K, so K micro-batches of B equal one batch of K*B. Under DDP the
    gradient all-reduce runs on the last micro-batch only (``no_sync`` on the others).
    """
    k = len(micro_batches)
    total = 0.0
    for i, (x, y) in enumerate(micro_batches):
        sync = not ddp or i == k - 1
        ctx = contextlib.nullcontext() if sync else model.no_sync()
        with ctx:
            with precision.autocast(device_type):
                _, loss = model(x, y)
                loss = loss / k
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach().float().item()
    return total


@torch.no_grad()
def evaluate(model: GPT, data: TokenData, *, batch_size: int, eval_iters: int, seed: int,
             precision: Precision, device: torch.device) -> dict[str, float]:
    """Mean loss, perplexity and next-token accuracy on both splits.

    Batches come from a generator seeded with ``seed`` every time, so every evaluation (across
    runs and resumes) sees the same windows, and the training RNG is never touched.
    """
    was_training = model.training
    model.eval()
    block = model.config.block_size
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
        losses, correct, count = [], 0, 0
        for _ in range(eval_iters):
            x, y = get_batch(data.tokens(split), batch_size, block, gen, device)
            with precision.autocast(device.type):
                logits, loss = model(x, y)
            losses.append(loss.float().item())
            correct += (logits.argmax(-1) == y).sum().item()
            count += y.numel()
        mean = sum(losses) / len(losses)
        out[f"{split}_loss"] = mean
        out[f"{split}_ppl"] = math.exp(min(mean, 700.0))
        out[f"{split}_acc"] = correct / count
    model.train(was_training)
    return out


def param_checksum(model: torch.nn.Module) -> str:
    sha = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        sha.update(name.encode())
        sha.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def update_latest_link(run_dir: Path) -> None:
    """Point ``<parent>/latest`` at ``run_dir`` (relative link, replaced atomically)."""
    if run_dir.name == "latest":
        return
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(run_dir.name, tmp, target_is_directory=True)
    os.replace(tmp, link)


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step (and save); a second one
    raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Interrupted(SlmError):
    """Training stopped on Ctrl-C after saving ckpt.pt (exit code 130)."""


# -- the run ---------------------------------------------------------------------------------

@dataclass
class TrainResult:
    step: int
    best_val_loss: float
    metrics: list[dict]
    out_dir: Path


def _rng_state(data_gen: torch.Generator, device: torch.device) -> dict:
    state = {"data": data_gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, data_gen: torch.Generator, device: torch.device) -> None:
    data_gen.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _load_start(cfg: TrainConfig, model_config: GPTConfig, out_dir: Path):
    """-> (model_config, resume checkpoint or None, initial weights or None), all validated."""
    if cfg.resume:
        path = out_dir / "ckpt.pt"
        if not path.is_file():
            raise SlmError(f"--resume: no checkpoint at {path}; start a run without --resume")
        ckpt = checkpoint.load(path)
        if ckpt["kind"] != "train":
            raise SlmError(f"--resume: {path} is a {ckpt['kind']!r} checkpoint, not a training one")
        if GPTConfig.from_dict(ckpt["model_config"]) != model_config:
            raise SlmError(f"--resume: {path} holds a model with config {ckpt['model_config']}, "
                           f"not the requested {model_config.to_dict()}")
        return model_config, ckpt, None
    if (out_dir / "ckpt.pt").exists():  # never overwrite a run by starting a new one over it
        raise SlmError(f"{out_dir} already holds a run (ckpt.pt); continue it with --resume, "
                       "or choose another --out-dir")
    if cfg.init_from:
        ckpt = checkpoint.load(cfg.init_from)
        return GPTConfig.from_dict(ckpt["model_config"]), None, ckpt["model"]
    return model_config, None, None


def _save(payload: dict, path: Path) -> None:
    """checkpoint.save, with a failed write (a full disk, no permission) as one line."""
    try:
        checkpoint.save(payload, path)
    except OSError as e:
        raise SlmError(f"cannot write {path} ({e.strerror or e}); the previous "
                       f"{path.name}, if any, is kept") from None


def train(cfg: TrainConfig, model_config: GPTConfig, *, progress: bool = True,
          checksum_dir: str | None = None) -> TrainResult:
    d, device = init_distributed(cfg.device)
    try:
        return _train(cfg, model_config, d, device, progress, checksum_dir)
    finally:
        if d.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, model_config: GPTConfig, d: Dist, device: torch.device,
           progress: bool, checksum_dir: str | None) -> TrainResult:
    out_dir = Path(cfg.out_dir)
    model_config, resume_ckpt, init_weights = _load_start(cfg, model_config, out_dir)

    source = Source(dataset=cfg.dataset, text_field=cfg.text_field, stories=cfg.stories,
                    val_fraction=cfg.val_fraction)
    if d.master:
        data = prepare(source, cfg.data_root)  # tokenize once, on rank 0
    _barrier(d)
    if not d.master:
        data = prepare(source, cfg.data_root)  # now a cached, validated folder
    if resume_ckpt is not None:
        old = resume_ckpt.get("data_meta", {}).get("splits", {})
        if old and old != data.meta["splits"]:
            raise SlmError(f"--resume: the data differs from the data {out_dir / 'ckpt.pt'} was "
                           "trained on (use --init-from to fine-tune on other data)")

    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    precision = select_precision(device.type, cfg.dtype, bf16_ok)

    torch.manual_seed(cfg.seed + d.rank)  # dropout masks differ per rank, as the data does
    data_gen = torch.Generator().manual_seed(cfg.seed + d.rank)
    raw_model = GPT(model_config)
    if init_weights is not None:
        try:
            raw_model.load_state_dict(init_weights)
        except RuntimeError as e:
            raise SlmError(f"--init-from {cfg.init_from}: weights do not match its model config "
                           f"({first_line(e, 120)})") from None
    raw_model.to(device)
    optimizer = optim.make_optimizer(raw_model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     device_type=device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)

    step, best_val = 0, float("inf")
    if resume_ckpt is not None:
        raw_model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        if resume_ckpt.get("scaler"):
            scaler.load_state_dict(resume_ckpt["scaler"])
        step = int(resume_ckpt["step"])
        best_val = float(resume_ckpt["best_val_loss"])
        states = resume_ckpt["rng"]
        if len(states) == d.world_size:
            _set_rng_state(states[d.rank], data_gen, device)
        elif d.master:
            print(f"note: checkpoint from {len(states)} process(es), resuming with "
                  f"{d.world_size}: data order restarts from the seed")

    model = raw_model
    if cfg.compile:
        model = torch.compile(raw_model)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    if d.master:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    if d.master and resume_ckpt is None:
        metrics_path.unlink(missing_ok=True)

    def save_state(current_step: int) -> None:
        """Gather every rank's RNG state; rank 0 writes ckpt.pt (a collective under DDP)."""
        state = _rng_state(data_gen, device)
        if d.enabled:
            gathered = [None] * d.world_size
            torch.distributed.all_gather_object(gathered, {k: v.cpu() for k, v in state.items()})
            states = gathered
        else:
            states = [state]
        if d.master:
            _save({
                "kind": "train", "model_config": model_config.to_dict(),
                "train_config": cfg.to_dict(), "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "step": current_step, "best_val_loss": best_val, "rng": states,
                "data_meta": data.meta, "world_size": d.world_size,
            }, out_dir / "ckpt.pt")

    tokens_per_step = cfg.batch_size * cfg.grad_accum * model_config.block_size * d.world_size
    metrics: list[dict] = []
    console_progress = _make_progress(progress and d.master)
    task = console_progress.add_task("train", total=cfg.max_iters, completed=step,
                                     info="") if console_progress else None
    window_t, window_steps = time.perf_counter(), 0
    last_tps, last_loss = 0.0, float("nan")
    t_start = time.perf_counter()

    def eval_and_save(current_step: int, lr: float) -> None:
        nonlocal best_val
        if d.master:
            m = evaluate(raw_model, data, batch_size=cfg.batch_size, eval_iters=cfg.eval_iters,
                         seed=cfg.seed, precision=precision, device=device)
            record = {"step": current_step, **m, "lr": lr, "tokens_per_s": last_tps,
                      "tokens": current_step * tokens_per_step,
                      "elapsed_s": time.perf_counter() - t_start}
            improved = m["val_loss"] < best_val
            if improved:
                best_val = m["val_loss"]
        if d.enabled:  # everyone must agree on best_val (it goes into ckpt.pt) - broadcast it
            box = [best_val]
            torch.distributed.broadcast_object_list(box, src=0)
            best_val = box[0]
        # best.pt before ckpt.pt: a crash between the two leaves a ckpt.pt whose best_val_loss
        # is never better than best.pt's (the resumed run rewrites best.pt on reaching it).
        if d.master and improved:
            payload = checkpoint.weights_payload(raw_model, model_config, step=current_step,
                                                 val_loss=best_val)
            payload["train_config"] = cfg.to_dict()
            _save(payload, out_dir / "best.pt")
        save_state(current_step)
        if d.master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            metrics.append(record)
            update_latest_link(out_dir)
            line = (f"step {current_step:>6} | train {m['train_loss']:.4f} | val {m['val_loss']:.4f}"
                    f" (ppl {m['val_ppl']:.1f}, acc {m['val_acc']:.3f}) | lr {lr:.2e}"
                    + (" | best" if improved else ""))
            if console_progress:
                console_progress.console.print(line, soft_wrap=True)
            elif progress:
                print(line, flush=True)

    model.train()
    with _StopFlag() as stop, (console_progress or contextlib.nullcontext()):
        if step == 0 and resume_ckpt is None:  # a resumed run has evaluated its start already
            eval_and_save(0, cfg.lr_at(0))
        window_t = time.perf_counter()
        while step < cfg.max_iters:
            lr = cfg.lr_at(step)
            optim.set_lr(optimizer, lr)
            micro = [get_batch(data.tokens("train"), cfg.batch_size, model_config.block_size,
                               data_gen, device) for _ in range(cfg.grad_accum)]
            last_loss = forward_backward(model, micro, precision, device.type,
                                         scaler if precision.use_scaler else None, ddp=d.enabled)
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            now = time.perf_counter()
            if now - window_t >= 2.0 or step == cfg.max_iters:
                last_tps = window_steps * tokens_per_step / (now - window_t)
                window_t, window_steps = now, 0
            if console_progress:
                console_progress.update(task, completed=step,
                                        info=f"loss {last_loss:.4f} | lr {lr:.2e} | "
                                             f"{last_tps:,.0f} tok/s")
            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                eval_and_save(step, lr)
                window_t, window_steps = time.perf_counter(), 0  # tokens/s excludes evaluation
            requested = stop.requested
            if d.enabled:  # stop together, or the others would wait forever in all-reduce
                flag = torch.tensor([1.0 if requested else 0.0], device=device)
                torch.distributed.all_reduce(flag)
                requested = flag.item() > 0
            if requested and step < cfg.max_iters:
                if step % cfg.eval_interval != 0:
                    save_state(step)
                raise Interrupted(f"interrupted at step {step}; saved {out_dir / 'ckpt.pt'}; "
                                  f"continue with the same command plus --resume")

    if checksum_dir:
        Path(checksum_dir).mkdir(parents=True, exist_ok=True)
        Path(checksum_dir, f"rank{d.rank}.json").write_text(json.dumps(
            {"rank": d.rank, "world_size": d.world_size, "checksum": param_checksum(raw_model),
             "last_loss": last_loss, "step": step}))
    if d.master and cfg.plots:
        from slm_export import plots

        plots.write_all(out_dir)
    return TrainResult(step, best_val, metrics, out_dir)


def _make_progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn())
