"""The training loop: mixed precision, gradient accumulation, evaluation, checkpoints, resume, DDP.

One ``TrainConfig`` (``slm_export.config``) describes a run. ``train(cfg, model_config)`` runs
it in this process; under ``torchrun`` every process runs it and they form a
DistributedDataParallel group (rank 0 alone evaluates, writes files and reports). A run
directory holds
- ``ckpt.pt`` (kind "train", written at every evaluation): everything needed to continue,
  including the data generator's state, so a resumed run replays the same batches;
- ``best.pt`` (kind "weights"): the weights with the lowest validation loss so far;
- ``metrics.jsonl``: one JSON line per evaluation; ``plots/*.png`` at the end.
Nothing here prints: progress, evaluation lines and warnings go to the ``Reporter`` the caller
passes in (``cli/train.py`` draws them with rich).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from slm_export import checkpoint, optim, plots
from slm_export.config import GPTConfig, TrainConfig
from slm_export.data import Source, TokenData, get_batch, prepare
from slm_export.devices import bf16_support, resolve_device
from slm_export.errors import SlmError, first_line
from slm_export.loss import NextTokenLoss, loss_and_correct
from slm_export.model import GPT

EVAL_SEED_OFFSET = 1_000_003  # eval batches come from their own generator: seed + this
STATUS_INTERVAL_S = 2.0  # the shown loss and tokens/s are means over windows this long
DATA_WAIT = datetime.timedelta(hours=2)  # DDP: how long ranks > 0 wait for rank 0 to tokenize


class Reporter(Protocol):
    """What a run tells its caller. Under DDP only rank 0 reports."""

    def start(self, total: int, done: int) -> None:
        """Training begins (or resumes) at step ``done`` of ``total``."""

    def progress(self, step: int, info: str) -> None:
        """Step ``step`` is done; ``info`` is a short status (loss, lr, tokens/s)."""

    def log(self, line: str) -> None:
        """One evaluation, as a line."""

    def warn(self, line: str) -> None:
        """Something the user should know; the run goes on."""

    def stop(self) -> None:
        """Training ended (finished, interrupted or failed)."""


class SilentReporter:
    """A Reporter that reports nothing (the default for library callers, and ranks > 0)."""

    def start(self, total: int, done: int) -> None:
        pass

    def progress(self, step: int, info: str) -> None:
        pass

    def log(self, line: str) -> None:
        pass

    def warn(self, line: str) -> None:
        pass

    def stop(self) -> None:
        pass


# -- precision -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    use_scaler: bool  # fp16 gradients need loss scaling; bf16 and fp32 do not

    def autocast(self, device_type: str):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.dtype)


def select_precision(device_type: str, requested: str = "auto", bf16: str = "none") -> Precision:
    """auto: bf16 autocast on a GPU with native bf16, else fp16 + GradScaler; fp32 on CPU.

    ``bf16`` is ``devices.bf16_support`` of the device: "native", "emulated" (pre-Ampere GPUs
    such as RTX 20xx / GTX 16xx run bf16 only emulated, slower than fp16, so auto picks fp16
    there) or "none". An explicit request wins where it can work: bf16 on CPU (autocast
    supports it) or on a GPU that emulates it; fp16 needs CUDA; bf16 on a GPU without any
    bf16 is refused.
    """
    cuda = device_type == "cuda"
    if requested == "auto":
        if not cuda:
            return Precision(torch.float32, False)
        requested = "bf16" if bf16 == "native" else "fp16"
    if requested == "fp32":
        return Precision(torch.float32, False)
    if requested == "bf16":
        if cuda and bf16 == "none":
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


def settle_collectives(timeout_s: float = 10.0) -> bool:
    """Under gloo, end with no collective in flight; call where every rank agrees to stop.

    A gloo worker thread lets go of a collective's tensors after it has woken the caller, and
    letting go takes the GIL. A rank that returns at once can reach interpreter shutdown first;
    the worker then dies holding the work and the process aborts ("terminate called without
    an active exception", exit -6, after a finished run; pytorch/pytorch PR 179291).
    destroy_process_group does not join gloo's workers. So: one last all-reduce, then release
    the GIL until its work has let go of its tensor. nccl's workers are joined by
    destroy_process_group, so there this does nothing. -> whether the work let go in time."""
    import torch.distributed as dist

    if dist.get_backend() != "gloo":
        return True
    token = torch.zeros(1)
    held = token._use_count()  # what a tensor no collective holds reads (1 or 2 by version)
    dist.all_reduce(token)
    deadline = time.monotonic() + timeout_s
    while token._use_count() > held:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)  # the worker takes the GIL while we sleep
    return True


@contextlib.contextmanager
def tf32_matmuls(device: torch.device):
    """On CUDA, let fp32 matmuls use TF32 tensor cores while training: "high" precision rounds
    their inputs to a 10-bit mantissa and accumulates in fp32, several times faster on Ampere
    and later GPUs at a precision training does not notice (it changes nothing on older GPUs,
    on the CPU, or for bf16 / fp16 autocast matmuls). The setting is global to the process, so
    it is restored afterwards."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


# -- the pieces of a step --------------------------------------------------------------------

def forward_backward(model: torch.nn.Module, micro_batches, precision: Precision,
                     device_type: str, scaler: torch.amp.GradScaler | None = None,
                     ddp: bool = False) -> torch.Tensor:
    """Accumulate gradients over K micro-batches of a ``NextTokenLoss`` (maybe wrapped by
    torch.compile / DDP); -> the mean loss, a detached 0-dim fp32 tensor on the device (reading
    it waits for the GPU, so the caller reads it only when it shows it).

    Each loss is divided by K, so K micro-batches of B equal one batch of K*B. Under DDP the
    gradient all-reduce runs on the last micro-batch only (``no_sync`` on the others).
    """
    k = len(micro_batches)
    total = None
    for i, (x, y) in enumerate(micro_batches):
        # GradScaler's scale as a device tensor (get_scale() would wait for the GPU)
        grad_scale = scaler.scale(torch.ones((), device=x.device)) if scaler is not None else None
        sync = not ddp or i == k - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            with precision.autocast(device_type):
                loss = model(x, y, grad_scale) / k
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach().float() if total is None else total + loss.detach().float()
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
        loss, correct = 0.0, 0  # become device tensors: read once per split
        for _ in range(eval_iters):
            x, y = get_batch(data.tokens(split), batch_size, block, gen, device)
            with precision.autocast(device.type):
                h = model.hidden_states(x).flatten(0, 1)
                batch_loss, batch_correct = loss_and_correct(h, model.lm_head.weight,
                                                             y.reshape(-1))
            loss, correct = loss + batch_loss, correct + batch_correct
        count = eval_iters * batch_size * block
        mean = float(loss) / count
        out[f"{split}_loss"] = mean
        out[f"{split}_ppl"] = math.exp(min(mean, 700.0))
        out[f"{split}_acc"] = int(correct) / count
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


class StopVote:
    """One step's Ctrl-C votes of every rank, summed by an all-reduce and read a step later.

    On CUDA the sum is copied to pinned host memory without blocking and an event marks the
    copy: reading waits for that event only (the all-reduce and the copy, long done by the
    next step), where ``.item()`` on the device tensor would wait for everything queued on
    the stream since, the next step's forward and backward included."""

    def __init__(self, requested: bool, device: torch.device):
        vote = torch.full((1,), float(requested), device=device)
        torch.distributed.all_reduce(vote)
        self.event = None
        if device.type == "cuda":  # CUDA-only (tests/test_training.py covers the CPU path)
            self.host = torch.empty(1, pin_memory=True)
            self.host.copy_(vote, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = vote

    def read(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host.item() > 0)


class Interrupted(SlmError):
    """Training stopped on Ctrl-C after saving ckpt.pt (exit code 130)."""


# -- starting a run ---------------------------------------------------------------------------

@dataclass
class TrainResult:
    step: int
    best_val_loss: float
    metrics: list[dict]  # this process's evaluations: empty on ranks > 0
    out_dir: Path


def load_resume(out_dir: str | os.PathLike) -> dict:
    """The training checkpoint ``out_dir/ckpt.pt`` a ``--resume`` continues from, validated."""
    path = Path(out_dir) / "ckpt.pt"
    if not path.is_file():
        raise SlmError(f"--resume: no checkpoint at {path}; start a run without --resume")
    ckpt = checkpoint.load(path)
    if ckpt["kind"] != "train":
        raise SlmError(f"--resume: {path} is a {ckpt['kind']!r} checkpoint, not a training one")
    return ckpt


def _load_start(cfg: TrainConfig, model_config: GPTConfig, resume: dict | None):
    """-> (model_config, resume checkpoint or None, initial weights or None), all validated."""
    out_dir = Path(cfg.out_dir)
    if cfg.resume:
        ckpt = resume if resume is not None else load_resume(out_dir)
        if GPTConfig.from_dict(ckpt["model_config"]) != model_config:
            raise SlmError(f"--resume: {out_dir / 'ckpt.pt'} holds a model with config "
                           f"{ckpt['model_config']}, not the requested {model_config.to_dict()}")
        return model_config, ckpt, None
    if (out_dir / "ckpt.pt").exists():  # never overwrite a run by starting a new one over it
        raise SlmError(f"{out_dir} already holds a run (ckpt.pt); continue it with --resume, "
                       "or choose another --out-dir")
    if cfg.init_from:
        ckpt = checkpoint.load(cfg.init_from)
        return GPTConfig.from_dict(ckpt["model_config"]), None, ckpt["model"]
    return model_config, None, None


def _prepare_data(cfg: TrainConfig, d: Dist, resume: dict | None) -> TokenData:
    """Tokenize the data once, and check that a resumed run continues on the data it was
    trained on."""
    source = Source.of(cfg)
    data = _prepare_on_rank0(source, cfg.data_root) if d.enabled else prepare(source, cfg.data_root)
    old = (resume or {}).get("data_meta", {}).get("splits", {})
    if old and old != data.meta["splits"]:
        raise SlmError(f"--resume: the data differs from the data {Path(cfg.out_dir) / 'ckpt.pt'} "
                       "was trained on (use --init-from to fine-tune on other data)")
    return data


def _prepare_on_rank0(source: Source, data_root: str) -> TokenData:
    """Under DDP rank 0 tokenizes while the others wait, then they open the cached folder.
    Tokenizing TinyStories on a laptop can outlast nccl's default 10-minute collective
    timeout, so the wait is a barrier on a gloo group of its own with a DATA_WAIT timeout."""
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=DATA_WAIT)
    try:
        data = prepare(source, data_root) if dist.get_rank() == 0 else None
        dist.barrier(group=group)
        if data is None:
            data = prepare(source, data_root)  # ranks > 0: now a cached, validated folder
        return data
    finally:
        dist.destroy_process_group(group)


class Batches:
    """The training batches in order: each step's ``micro`` micro-batches of random windows,
    drawn from ``generator``. ``prefetch`` draws the next step's early (on CUDA their copy to
    the GPU then overlaps the step that is running); ``state`` is the generator state that
    replays the first batch not yet taken, so a checkpoint never skips a prefetched one."""

    def __init__(self, tokens, batch_size: int, block_size: int, micro: int,
                 generator: torch.Generator, device: torch.device):
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.micro, self.generator, self.device = micro, generator, device
        self._next: tuple[torch.Tensor, list] | None = None  # (state before drawing, batches)

    def prefetch(self) -> None:
        if self._next is None:
            state = self.generator.get_state()
            self._next = (state, [get_batch(self.tokens, self.batch_size, self.block_size,
                                            self.generator, self.device)
                                  for _ in range(self.micro)])

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.prefetch()
        batches, self._next = self._next[1], None
        return batches

    def state(self) -> torch.Tensor:
        return self._next[0] if self._next is not None else self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
        self._next = None


def _rng_state(batches: Batches, device: torch.device) -> dict:
    state = {"data": batches.state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, batches: Batches, device: torch.device) -> None:
    batches.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save(payload: dict, path: Path) -> None:
    """checkpoint.save, with a failed write (a full disk, no permission) as one line."""
    try:
        checkpoint.save(payload, path)
    except OSError as e:
        raise SlmError(f"cannot write {path} ({e.strerror or e}); the previous "
                       f"{path.name}, if any, is kept") from None


def agreed_checksum(checksums: list[str], step: int) -> str:
    """Every rank's parameter checksum must be the same: DDP keeps replicas identical, so a
    difference is a bug or a broken device, and a checkpoint of one rank's weights would hide it."""
    if len(set(checksums)) > 1:
        listed = ", ".join(f"rank {i}: {c[:12]}" for i, c in enumerate(checksums))
        raise SlmError(f"DDP ranks diverged by step {step}: their parameters differ ({listed}); "
                       "ckpt.pt was not updated")
    return checksums[0]


# -- the run ---------------------------------------------------------------------------------

def train(cfg: TrainConfig, model_config: GPTConfig, *, reporter: Reporter | None = None,
          resume: dict | None = None) -> TrainResult:
    """Run ``cfg``. ``resume``: the run's ckpt.pt when the caller has loaded it already
    (``load_resume``); with ``cfg.resume`` and no ``resume`` it is loaded here."""
    d, device = init_distributed(cfg.device)
    try:
        trainer = Trainer(cfg, model_config, d, device, reporter or SilentReporter(), resume)
        return trainer.run()
    finally:
        if d.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class Trainer:
    """One run, in the order it happens: ``__init__`` sets up (data, model, optimizer) and
    resumes; ``run`` alternates ``train_step`` with ``evaluate_and_checkpoint`` (every
    eval_interval steps), then ``finish`` draws the plots. Under DDP every rank runs it; rank 0
    alone evaluates, writes files and reports."""

    def __init__(self, cfg: TrainConfig, model_config: GPTConfig, dist: Dist,
                 device: torch.device, reporter: Reporter, resume: dict | None = None):
        self.cfg, self.dist, self.device = cfg, dist, device
        self.report = reporter if dist.master else SilentReporter()
        self.out_dir = Path(cfg.out_dir)
        self.model_config, resume, init_weights = _load_start(cfg, model_config, resume)
        self.data = _prepare_data(cfg, dist, resume)
        self.precision = select_precision(device.type, cfg.dtype, bf16_support(device))
        torch.manual_seed(cfg.seed + dist.rank)  # dropout masks differ per rank, as the data does
        self.batches = Batches(self.data.tokens("train"), cfg.batch_size,
                               self.model_config.block_size, cfg.grad_accum,
                               torch.Generator().manual_seed(cfg.seed + dist.rank), device)
        self.raw_model = self._build_model(init_weights)
        self.optimizer = optim.make_optimizer(self.raw_model, lr=cfg.lr,
                                              weight_decay=cfg.weight_decay,
                                              device_type=device.type)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.use_scaler)
        self.step, self.best_val, self.resumed = 0, float("inf"), resume is not None
        if resume is not None:
            self._resume(resume)
        self.model = self._wrap(self.raw_model)
        self.metrics: list[dict] = []
        self.metrics_path = self.out_dir / "metrics.jsonl"
        if dist.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not self.resumed:
                self.metrics_path.unlink(missing_ok=True)
        self.tokens_per_step = (cfg.batch_size * cfg.grad_accum * self.model_config.block_size
                                * dist.world_size)
        self.tokens_per_s, self.status, self._stop_vote = 0.0, "", None
        self._t_start = time.perf_counter()
        self._restart_window()

    # -- setup ---------------------------------------------------------------------------------

    def _build_model(self, init_weights: dict | None) -> GPT:
        model = GPT(self.model_config)
        if init_weights is not None:
            try:
                model.load_state_dict(init_weights)
            except RuntimeError as e:
                raise SlmError(f"--init-from {self.cfg.init_from}: weights do not match its model "
                               f"config ({first_line(e, 120)})") from None
        return model.to(self.device)

    def _resume(self, ckpt: dict) -> None:
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.best_val = float(ckpt["best_val_loss"])
        states = ckpt["rng"]
        if len(states) == self.dist.world_size:
            _set_rng_state(states[self.dist.rank], self.batches, self.device)
        else:
            self.report.warn(f"checkpoint from {len(states)} process(es), resuming with "
                             f"{self.dist.world_size}: data order restarts from the seed")

    def _wrap(self, gpt: GPT) -> torch.nn.Module:
        """What the step differentiates: the chunked loss of ``gpt``, through torch.compile and
        DDP when asked; checkpoints always save the raw GPT's names."""
        model = NextTokenLoss(gpt)
        if self.cfg.compile:
            model = torch.compile(model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DDP(model, device_ids=device_ids)
        return model

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.model.train()
        self.report.start(cfg.max_iters, self.step)
        try:
            with _StopFlag() as stop, tf32_matmuls(self.device):
                if not self.resumed:  # a resumed run has evaluated its start already
                    self.evaluate_and_checkpoint(self.lr_at(0))
                self._restart_window()
                while self.step < cfg.max_iters:
                    lr, loss = self.train_step()
                    self._show_progress(lr, loss)
                    if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                        self.evaluate_and_checkpoint(lr)
                        self._restart_window()  # tokens/s excludes evaluation
                    if self._stop_requested(stop) and self.step < cfg.max_iters:
                        self._interrupt()
                self._end_collectives()
        finally:
            self.report.stop()
        self.finish()
        return TrainResult(self.step, self.best_val, self.metrics, self.out_dir)

    def lr_at(self, step: int) -> float:
        return optim.lr_at(step, **self.cfg.schedule)

    def train_step(self) -> tuple[float, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches; -> (its learning rate, its mean
        loss as a device tensor)."""
        cfg, lr = self.cfg, self.lr_at(self.step)
        optim.set_lr(self.optimizer, lr)
        loss = forward_backward(self.model, self.batches.take(), self.precision, self.device.type,
                                self.scaler if self.precision.use_scaler else None,
                                ddp=self.dist.enabled)
        if self.step + 1 < cfg.max_iters:
            self.batches.prefetch()  # read while the GPU works through the queued backward
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return lr, loss

    def _restart_window(self) -> None:
        self._window_t, self._window_steps, self._window_loss = time.perf_counter(), 0, 0.0

    def _show_progress(self, lr: float, loss: torch.Tensor) -> None:
        """Report the step; every STATUS_INTERVAL_S (and at the first and last step) refresh the
        status: mean loss and tokens/s over the window. Reading the loss waits for the GPU, so
        it happens only then."""
        self._window_steps += 1
        self._window_loss = self._window_loss + loss  # stays on the device
        now = time.perf_counter()
        if (now - self._window_t >= STATUS_INTERVAL_S or self.step == self.cfg.max_iters
                or not self.status):
            mean = float(self._window_loss) / self._window_steps  # waits for the GPU
            now = time.perf_counter()
            self.tokens_per_s = self._window_steps * self.tokens_per_step / (now - self._window_t)
            self.status = f"loss {mean:.4f} | lr {lr:.2e} | {self.tokens_per_s:,.0f} tok/s"
            self._restart_window()
        self.report.progress(self.step, self.status)

    def _stop_requested(self, stop: _StopFlag) -> bool:
        if not self.dist.enabled:
            return stop.requested
        # Every rank must stop after the same step, or the others would wait forever in the next
        # all-reduce. The votes are summed on the device and read one step later.
        previous = self._stop_vote
        self._stop_vote = StopVote(stop.requested, self.device)
        return previous is not None and previous.read()

    def _end_collectives(self) -> None:
        """Every rank ends here together (finished, or interrupted after the same step)."""
        if self.dist.enabled:
            settle_collectives()

    def _interrupt(self):
        if self.step % self.cfg.eval_interval != 0:  # else this step's checkpoint is written
            self.save_checkpoint()
        self._end_collectives()
        raise Interrupted(f"interrupted at step {self.step}; saved {self.out_dir / 'ckpt.pt'}; "
                          "continue with the same command plus --resume")

    # -- evaluation and checkpoints --------------------------------------------------------------

    def evaluate_and_checkpoint(self, lr: float) -> None:
        """Evaluate (rank 0), write best.pt when val loss improved, ckpt.pt, a metrics line."""
        record, improved = {}, False
        if self.dist.master:
            m = evaluate(self.raw_model, self.data, batch_size=self.cfg.batch_size,
                         eval_iters=self.cfg.eval_iters, seed=self.cfg.seed,
                         precision=self.precision, device=self.device)
            record = {"step": self.step, **m, "lr": lr, "tokens_per_s": self.tokens_per_s,
                      "tokens": self.step * self.tokens_per_step,
                      "elapsed_s": time.perf_counter() - self._t_start}
            improved = m["val_loss"] < self.best_val
            if improved:
                self.best_val = m["val_loss"]
        if self.dist.enabled:  # everyone must agree on best_val (it goes into ckpt.pt)
            box = [self.best_val]
            torch.distributed.broadcast_object_list(box, src=0)
            self.best_val = box[0]
        # best.pt before ckpt.pt: a crash between the two leaves a ckpt.pt whose best_val_loss
        # is never better than best.pt's (the resumed run rewrites best.pt on reaching it).
        if self.dist.master and improved:
            payload = checkpoint.weights_payload(self.raw_model, self.model_config,
                                                 step=self.step, val_loss=self.best_val)
            payload["train_config"] = self.cfg.to_dict()
            _save(payload, self.out_dir / "best.pt")
        checksum = self.save_checkpoint()
        if self.dist.master:
            if checksum is not None:
                record["param_sha256"] = checksum
            self._append_metrics(record, improved)

    def _append_metrics(self, record: dict, improved: bool) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.metrics.append(record)
        update_latest_link(self.out_dir)
        self.report.log(f"step {record['step']:>6} | train {record['train_loss']:.4f} | "
                        f"val {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f}, "
                        f"acc {record['val_acc']:.3f}) | lr {record['lr']:.2e}"
                        + (" | best" if improved else ""))

    def save_checkpoint(self) -> str | None:
        """Write ckpt.pt (rank 0) with every rank's RNG state: a collective under DDP, where
        the ranks' parameter checksums must also agree. -> that checksum under DDP, else None."""
        state = _rng_state(self.batches, self.device)
        checksum = None
        if self.dist.enabled:
            mine = {"rng": {k: v.cpu() for k, v in state.items()},
                    "params": param_checksum(self.raw_model)}
            gathered = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, mine)
            states = [g["rng"] for g in gathered]
            checksum = agreed_checksum([g["params"] for g in gathered], self.step)
        else:
            states = [state]
        if self.dist.master:
            _save({
                "kind": "train", "model_config": self.model_config.to_dict(),
                "train_config": self.cfg.to_dict(), "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "best_val_loss": self.best_val, "rng": states,
                "data_meta": self.data.meta, "world_size": self.dist.world_size,
            }, self.out_dir / "ckpt.pt")
        return checksum

    def finish(self) -> None:
        """Draw the plots (rank 0). They are a by-product: a failure is a warning, never a
        failed run, since the checkpoints are written."""
        if not (self.dist.master and self.cfg.plots):
            return
        try:
            plots.write_all(self.out_dir, warn=self.report.warn)
        except Exception as e:
            self.report.warn(f"plots not drawn ({type(e).__name__}: {first_line(e, 120)})")


# -- a brief run: the trained model of the tests and the bench ----------------------------------

BRIEF = dict(batch_size=8, lr=2e-3, min_lr=2e-4, eval_iters=4)  # the same for every preset


def train_brief(preset: str, steps: int, out_dir: str | os.PathLike, data_root: str | os.PathLike,
                stories: int = TrainConfig.stories, device: str = "cpu") -> Path:
    """``preset`` trained ``steps`` steps on the embedded stories with the ``BRIEF`` recipe
    (warm-up over a fifth of the run, one evaluation at the end) -> its best.pt: a model
    whose greedy text is varied English-like stories, as quality checks and speculative
    decoding need (random weights repeat one token, which every backend agrees on)."""
    from slm_export.config import preset as preset_config

    cfg = TrainConfig(dataset="stories", stories=stories, out_dir=str(out_dir),
                      data_root=str(data_root), max_iters=steps, eval_interval=steps,
                      warmup_iters=min(100, max(1, steps // 5)), device=device, plots=False, **BRIEF)
    train(cfg, preset_config(preset))
    return Path(out_dir) / "best.pt"
