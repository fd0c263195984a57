"""The trainer: schedule, optimizer groups, precision choice, accumulation, checkpoints, resume,
DDP on CPU, Ctrl-C and error paths, mostly through the `train.py` command line."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slm_export import checkpoint, devices, optim, tokenizer, training
from slm_export.cli.train import main
from slm_export.config import PRESETS, RECIPE_FIELDS, GPTConfig, TrainConfig, recipe
from slm_export.data import Source, get_batch, prepare
from slm_export.devices import resolve_device
from slm_export.errors import SlmError
from slm_export.loss import NextTokenLoss
from slm_export.model import GPT
from slm_export.training import (
    EVAL_SEED_OFFSET,
    agreed_checksum,
    evaluate,
    forward_backward,
    param_checksum,
    select_precision,
    settle_collectives,
    tf32_matmuls,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
SMALL = ["--preset", "tiny", "--stories", "300", "--block-size", "32", "--n-layer", "1",
         "--n-head", "2", "--n-embd", "32", "--batch-size", "4", "--eval-iters", "2",
         "--no-plots", "--quiet"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare(Source.of(stories=300), root)
    return root


def small(data_root: Path, out: Path, *extra: str) -> list[str]:
    return [*SMALL, "--data-root", str(data_root), "--out-dir", str(out), *extra]


def run_cli(args: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout, cwd=kw.get("cwd", ROOT))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_dataset_flags_of_the_datasets_conventions(tmp_path):
    """--dataset-config, --train-split, --val-split and --streaming through train.py, on a
    local folder shaped like a hub dataset (a card with a named config and split names)."""
    folder = tmp_path / "card"
    folder.mkdir()
    story = "Once upon a time, a little fox named Leo found a red ball in the garden. "
    for name, n in (("train.jsonl", 60), ("validation.jsonl", 8)):
        (folder / name).write_text("".join(json.dumps({"text": story * 3 + str(i)}) + "\n"
                                           for i in range(n)))
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: small\n  data_files:\n  - split: stories\n"
        "    path: train.jsonl\n  - split: held\n    path: validation.jsonl\n---\n")
    args = [*small(tmp_path / "data", tmp_path / "run"), "--dataset", str(folder)]
    r = run_cli([*args, "--dataset-config", "small", "--train-split", "stories",
                 "--val-split", "held", "--streaming", "--max-iters", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads(next((tmp_path / "data").glob("*/meta.json")).read_text())
    assert meta["split"] == {"method": "the source's 'held' split"}
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (60, 8)
    r = run_cli([*args, "--out-dir", str(tmp_path / "run2"), "--dataset-config", "small",
                 "--train-split", "train", "--max-iters", "2"])
    assert r.returncode == 2 and "no 'train' split" in r.stderr and "Traceback" not in r.stderr


# -- pure pieces -----------------------------------------------------------------------------

def test_lr_schedule_warmup_cosine_floor():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_iters=10, decay_iters=110)
    assert optim.lr_at(0, **kw) == pytest.approx(1e-4)  # 1/10 of the peak
    assert optim.lr_at(4, **kw) == pytest.approx(5e-4)
    assert optim.lr_at(9, **kw) == pytest.approx(1e-3)
    assert optim.lr_at(10, **kw) == pytest.approx(1e-3)  # cosine starts at the peak
    assert optim.lr_at(60, **kw) == pytest.approx(5.5e-4)  # halfway: mean of lr and min_lr
    assert optim.lr_at(110, **kw) == pytest.approx(1e-4)
    assert optim.lr_at(10_000, **kw) == 1e-4  # floor
    lrs = [optim.lr_at(s, **kw) for s in range(10, 200)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # never rises after warmup
    assert min(lrs) == 1e-4 and max(lrs) <= 1e-3


def test_param_groups_decay_matrices_and_embeddings_only():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    decay, no_decay = optim.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "transformer.wte.weight" in decay["names"] and "transformer.wpe.weight" in decay["names"]
    assert "transformer.h.1.attn.c_attn.weight" in decay["names"]
    assert "transformer.h.0.mlp.c_proj.weight" in decay["names"]
    assert "lm_head.weight" not in decay["names"] + no_decay["names"]  # tied: listed once
    assert "transformer.h.0.attn.c_attn.bias" in no_decay["names"]
    assert "transformer.ln_f.weight" in no_decay["names"]
    assert all(not n.endswith("bias") and ".ln_" not in n for n in decay["names"])
    n_params = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n_params == model.num_params()
    opt = optim.make_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert opt.defaults["eps"] == 1e-8 and opt.defaults["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("device,requested,bf16,dtype,scaler", [
    ("cpu", "auto", "none", torch.float32, False),
    ("cpu", "bf16", "none", torch.bfloat16, False),
    ("cpu", "fp32", "none", torch.float32, False),
    ("cuda", "auto", "native", torch.bfloat16, False),
    ("cuda", "auto", "emulated", torch.float16, True),  # pre-Ampere: fp16 + GradScaler
    ("cuda", "auto", "none", torch.float16, True),
    ("cuda", "bf16", "emulated", torch.bfloat16, False),  # asked for: slow, but it works
    ("cuda", "fp16", "native", torch.float16, True),
    ("cuda", "fp32", "native", torch.float32, False),
])
def test_select_precision(device, requested, bf16, dtype, scaler):
    p = select_precision(device, requested, bf16)
    assert (p.dtype, p.use_scaler) == (dtype, scaler)


@pytest.mark.parametrize("device,requested,bf16", [("cpu", "fp16", "none"), ("cuda", "bf16", "none")])
def test_select_precision_refuses_what_cannot_work(device, requested, bf16):
    with pytest.raises(SlmError):
        select_precision(device, requested, bf16)


@pytest.mark.parametrize("capability,runs,expected", [
    ((7, 5), True, "emulated"),  # RTX 20xx / GTX 16xx: is_bf16_supported() says True
    ((6, 1), False, "none"),
    ((8, 0), True, "native"),
    ((9, 0), True, "native"),
])
def test_bf16_support_asks_the_devices_compute_capability(monkeypatch, capability, runs, expected):
    asked = []
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(devices, "_bf16_runs_on", lambda device: runs)
    cuda1 = torch.device("cuda", 1)
    assert devices.bf16_support(cuda1) == expected
    assert asked == [cuda1]  # the device used, not the current one
    auto = select_precision("cuda", "auto", devices.bf16_support(cuda1))
    assert auto.dtype == (torch.bfloat16 if expected == "native" else torch.float16)
    assert devices.bf16_support(torch.device("cpu")) == "none"


def test_tf32_matmuls_only_on_cuda_and_restored():
    before = torch.get_float32_matmul_precision()
    with tf32_matmuls(torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before
    with tf32_matmuls(torch.device("cuda")):  # the setting needs no GPU to be read back
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before


def test_device_names_are_checked_in_one_place():
    from slm_export.cli.common import device

    assert [device(n) for n in ("auto", "cpu", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "cuda1"):
        with pytest.raises(argparse.ArgumentTypeError):
            device(bad)
        with pytest.raises(SlmError, match="unknown device"):
            resolve_device(bad)
    assert resolve_device("cpu") == torch.device("cpu")


def test_train_config_from_dict_is_strict():
    cfg = TrainConfig(max_iters=7, dataset="x.jsonl")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SlmError, match=r"unknown fields: \['bogus'\]"):
        TrainConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_defaults_live_in_one_place():
    """A Source has no defaults of its own: TrainConfig's; the 30m recipe is TrainConfig's
    defaults."""
    assert Source.of() == Source.of(TrainConfig())
    assert (Source.of().text_field, Source.of().seed) == (TrainConfig.text_field, TrainConfig.data_seed)
    with pytest.raises(TypeError):
        Source()
    assert recipe("30m") == {k: getattr(TrainConfig(), k) for k in RECIPE_FIELDS}
    assert recipe("tiny")["max_iters"] == 300 and recipe("tiny")["lr"] == 2e-3


def test_library_reports_through_its_reporter_and_never_prints(data_root, tmp_path, capsys):
    class Recorder:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):  # start, progress, log, warn, stop
            return lambda *args: self.calls.append((name, *args))

    cfg = TrainConfig(stories=300, data_root=str(data_root), out_dir=str(tmp_path / "run"),
                      max_iters=3, batch_size=2, eval_interval=2, eval_iters=1, warmup_iters=1,
                      device="cpu", plots=False)
    recorder = Recorder()
    result = train(cfg, GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32), reporter=recorder)
    assert capsys.readouterr() == ("", "")
    names = [c[0] for c in recorder.calls]
    assert names[0] == "start" and recorder.calls[0][1:] == (3, 0) and names[-1] == "stop"
    assert [c[1] for c in recorder.calls if c[0] == "progress"] == [1, 2, 3]
    logs = [c[1] for c in recorder.calls if c[0] == "log"]
    assert len(logs) == 3 and logs[0].startswith("step      0 | train ") and "warn" not in names
    assert [m["step"] for m in result.metrics] == [0, 2, 3]


def test_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.0)
    a, b = GPT(config), GPT(config)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, config.vocab_size, (8, 16))
    y = torch.randint(0, config.vocab_size, (8, 16))
    fp32 = select_precision("cpu", "fp32")
    loss_k = forward_backward(NextTokenLoss(a), [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)],
                              fp32, "cpu")
    loss_1 = forward_backward(NextTokenLoss(b), [(x, y)], fp32, "cpu")
    assert loss_k.shape == () and loss_k.dtype == torch.float32  # left on the device
    assert loss_k.item() == pytest.approx(loss_1.item(), abs=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-4, msg=name)


def _plain_and_chunked(dtype: torch.dtype, autocast: torch.dtype | None = None,
                       scale: float | None = None):
    """Loss and gradients of GPT.forward's plain cross-entropy and of NextTokenLoss in chunks
    of 7 rows (64 rows, some targets ignored), on the same weights and batch."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=1000, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)
    plain = GPT(config).to(dtype)
    chunked = GPT(config).to(dtype)
    chunked.load_state_dict(plain.state_dict())
    x = torch.randint(0, config.vocab_size, (4, 16))
    y = torch.randint(0, config.vocab_size, (4, 16))
    y[0, :5] = -1
    grad_scale = None if scale is None else torch.tensor(scale)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss_plain = plain(x, y)[1]
        loss_chunked = NextTokenLoss(chunked, chunk_rows=7)(x, y, grad_scale)
    (loss_plain * (scale or 1) / 3).backward()  # as GradScaler and --grad-accum 3 would
    (loss_chunked * (scale or 1) / 3).backward()
    return (loss_plain, loss_chunked,
            [(n, p.grad, q.grad) for (n, p), q in zip(plain.named_parameters(),
                                                       chunked.parameters(), strict=True)])


@pytest.mark.parametrize("scale", [None, 1024.0])
def test_chunked_loss_equals_plain_cross_entropy(scale):
    loss_plain, loss_chunked, grads = _plain_and_chunked(torch.float32, scale=scale)
    assert abs(loss_chunked.item() - loss_plain.item()) <= 1e-6 * loss_plain.item()
    for name, g_plain, g_chunked in grads:
        torch.testing.assert_close(g_chunked / (scale or 1), g_plain / (scale or 1), atol=1e-6,
                                   rtol=0, msg=name)
    loss_plain, loss_chunked, grads = _plain_and_chunked(torch.float64, scale=scale)
    assert abs(loss_chunked.item() - loss_plain.item()) <= 1e-12  # the same arithmetic
    for name, g_plain, g_chunked in grads:
        torch.testing.assert_close(g_chunked, g_plain, atol=1e-12 * (scale or 1), rtol=0, msg=name)


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
def test_chunked_loss_under_autocast_matches_autograd(autocast):
    """fp16: the gradients are formed at GradScaler's scale, as autograd's are (unscaled, small
    probabilities would underflow in the fp16 matmuls)."""
    scale = 1024.0 if autocast == torch.float16 else None
    loss_plain, loss_chunked, grads = _plain_and_chunked(torch.float32, autocast, scale)
    assert loss_chunked.item() == pytest.approx(loss_plain.item(), rel=1e-3)
    for name, g_plain, g_chunked in grads:
        torch.testing.assert_close(g_chunked / (scale or 1), g_plain / (scale or 1), atol=2e-3,
                                   rtol=0.05, msg=name)


def test_evaluation_in_chunks_is_exact(data_root):
    """evaluate() (chunked) against GPT.forward's full logits on the same batches."""
    torch.manual_seed(3)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)).eval()
    data = prepare(Source.of(stories=300), data_root)
    fp32 = select_precision("cpu", "fp32")
    m = evaluate(model, data, batch_size=33, eval_iters=2, seed=5, precision=fp32,
                 device=torch.device("cpu"))  # 33 x 32 = 1056 rows: two chunks per batch
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(5 + EVAL_SEED_OFFSET)
        losses, correct = [], 0
        for _ in range(2):
            x, y = get_batch(data.tokens(split), 33, 32, gen)
            with torch.no_grad():
                logits, loss = model(x, y)
            losses.append(loss.item())
            correct += (logits.argmax(-1) == y).sum().item()
        assert m[f"{split}_acc"] == correct / (2 * 33 * 32)  # exactly
        assert m[f"{split}_loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)


def test_failing_checkpoint_write_keeps_previous_file(tmp_path, monkeypatch):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    path = tmp_path / "ckpt.pt"
    checkpoint.save(checkpoint.weights_payload(model, model.config, step=7), path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(checkpoint.weights_payload(model, model.config, step=8), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert checkpoint.load(path)["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


# -- through the command line -----------------------------------------------------------------

def test_train_writes_run_and_resume_matches_straight_run(data_root, tmp_path):
    sched = ["--warmup-iters", "2", "--lr-decay-iters", "8", "--eval-interval", "3", "--lr", "3e-3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(small(data_root, straight, *sched, "--max-iters", "6")) == 0
    assert main(small(data_root, split, *sched, "--max-iters", "3")) == 0
    assert main(small(data_root, split, "--resume", "--max-iters", "6")) == 0

    a, b = metrics(straight), metrics(split)
    assert [m["step"] for m in a] == [0, 3, 6] == [m["step"] for m in b]
    for ma, mb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "val_acc", "lr"):
            assert abs(ma[key] - mb[key]) <= 1e-6, (ma["step"], key)
    assert a[-1]["val_loss"] < a[0]["val_loss"]  # it learns something in 6 steps
    assert a[0]["val_loss"] == pytest.approx(math.log(50257), abs=0.2)
    assert {"step", "train_loss", "val_loss", "val_ppl", "val_acc", "lr", "tokens_per_s"} <= set(a[-1])
    assert a[-1]["val_ppl"] == pytest.approx(math.exp(a[-1]["val_loss"]))

    ca, cb = checkpoint.load(straight / "ckpt.pt"), checkpoint.load(split / "ckpt.pt")
    assert ca["kind"] == "train" and ca["step"] == cb["step"] == 6
    for k, v in ca["model"].items():
        assert not k.startswith("_orig_mod.")
        torch.testing.assert_close(v, cb["model"][k], atol=1e-6, rtol=0)
    best = checkpoint.load(straight / "best.pt")
    assert best["kind"] == "weights" and best["tokenizer"] == "gpt2"
    assert best["val_loss"] == pytest.approx(min(m["val_loss"] for m in a))
    assert os.readlink(tmp_path / "latest") == "split"  # the last run started

    # --init-from: the weights carry over, the optimizer and step start afresh
    tuned = tmp_path / "tuned"
    assert main(small(data_root, tuned, "--init-from", str(straight / "best.pt"),
                      "--max-iters", "1")) == 0
    first = metrics(tuned)[0]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(best["val_loss"], abs=1e-6)
    assert checkpoint.load(tuned / "ckpt.pt")["step"] == 1


def test_resume_after_ctrl_c_between_evaluations_matches_a_straight_run(data_root, tmp_path,
                                                                          monkeypatch):
    """Dropout 0.1 (so resuming must restore the torch RNG), --grad-accum 2 (two batches a
    step, one of them prefetched when the checkpoint is written) and Ctrl-C during step 4,
    between the evaluations at 3 and 6: the resumed run matches a straight one to 1e-6."""
    flags = ["--dropout", "0.1", "--grad-accum", "2", "--eval-interval", "3", "--warmup-iters", "2",
             "--lr", "3e-3", "--lr-decay-iters", "8", "--max-iters", "7"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(small(data_root, straight, *flags)) == 0

    steps = []

    def ctrl_c_during_step_4(*args, **kwargs):
        steps.append(None)
        if len(steps) == 4:
            signal.raise_signal(signal.SIGINT)  # what a Ctrl-C in the terminal sends
        return real_forward_backward(*args, **kwargs)

    real_forward_backward = training.forward_backward
    monkeypatch.setattr(training, "forward_backward", ctrl_c_during_step_4)
    assert main(small(data_root, split, *flags)) == 130
    monkeypatch.undo()
    assert checkpoint.load(split / "ckpt.pt")["step"] == 4  # saved between evaluations
    assert main(small(data_root, split, *flags, "--resume")) == 0

    a, b = metrics(straight), metrics(split)
    assert [m["step"] for m in a] == [0, 3, 6, 7] == [m["step"] for m in b]
    for ma, mb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "val_acc", "lr"):
            assert abs(ma[key] - mb[key]) <= 1e-6, (ma["step"], key, ma[key], mb[key])
    wa, wb = checkpoint.load(straight / "ckpt.pt")["model"], checkpoint.load(split / "ckpt.pt")["model"]
    for k, v in wa.items():
        torch.testing.assert_close(wb[k], v, atol=1e-6, rtol=0, msg=k)


@pytest.mark.slow  # torch.compile's first build takes ~1 minute on 2 CPU cores
def test_compile_keeps_checkpoint_keys_clean(data_root, tmp_path):
    out = tmp_path / "compiled"
    assert main(small(data_root, out, "--compile", "--max-iters", "1")) == 0
    ckpt = checkpoint.load(out / "ckpt.pt")
    assert ckpt["step"] == 1 and "transformer.wte.weight" in ckpt["model"]
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])


@pytest.mark.parametrize("rank", [0, 1])
def test_ddp_data_wait_outlasts_nccls_default_timeout(monkeypatch, tmp_path, rank):
    """Rank 0 tokenizes while the others wait on a gloo barrier of their own with a long
    timeout (nccl's default collective timeout is 10 minutes)."""
    import torch.distributed as dist

    from slm_export import training

    calls = []
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.append(("new_group", kw)) or "G")
    monkeypatch.setattr(dist, "barrier", lambda group=None: calls.append(("barrier", group)))
    monkeypatch.setattr(dist, "destroy_process_group",
                        lambda group=None: calls.append(("destroy", group)))
    monkeypatch.setattr(training, "prepare", lambda source, root: calls.append(("prepare",)) or root)
    assert training._prepare_on_rank0(Source.of(stories=10), "ROOT") == "ROOT"
    kw = calls[0][1]
    assert kw["backend"] == "gloo" and kw["timeout"] >= datetime.timedelta(hours=1)
    order = [c[0] for c in calls[1:]]
    assert order == (["prepare", "barrier", "destroy"] if rank == 0
                     else ["barrier", "prepare", "destroy"])
    assert ("barrier", "G") in calls and ("destroy", "G") in calls


def test_a_gloo_run_ends_with_no_collective_holding_a_tensor(monkeypatch):
    """A finished DDP run on CPU aborted now and then at exit (-6) when gloo's worker let go
    of the last collective's tensor during interpreter shutdown. settle_collectives returns
    only once the worker has let go."""
    import torch.distributed as dist

    sent, all_reduce = [], dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: sent.append(t) or all_reduce(t, **kw))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for _ in range(5):
            idle = torch.zeros(1)._use_count()
            assert settle_collectives()
            assert sent[-1]._use_count() == idle
    finally:
        dist.destroy_process_group()
    assert len(sent) == 5


def test_ddp_two_processes_on_cpu_stay_in_sync(data_root, tmp_path):
    # --standalone: a rendezvous on a free port (a fixed port can be held by another process)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"),
           *small(data_root, tmp_path / "ddp", "--max-iters", "4", "--grad-accum", "2",
                  "--eval-interval", "2", "--device", "cpu")]
    # faulthandler: a rank that dies of a signal prints its Python threads' stacks
    r = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "PYTHONFAULTHANDLER": "1"},
                       timeout=180, cwd=ROOT)
    # where a rank dies, its own message comes first and the launcher's report last
    assert r.returncode == 0, r.stderr[:3000] + "\n...\n" + r.stderr[-1500:]
    records = metrics(tmp_path / "ddp")
    assert [m["step"] for m in records] == [0, 2, 4]  # rank 0 alone writes
    # at every checkpoint rank 0 checked that both ranks hold the same weights...
    ckpt = checkpoint.load(tmp_path / "ddp" / "ckpt.pt")
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    assert records[-1]["param_sha256"] == param_checksum(model)  # ...the weights in ckpt.pt
    assert len({m["param_sha256"] for m in records}) == 3  # which changed at every step
    # ...trained on different batches: each rank drew from its own data generator
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["data"], ckpt["rng"][1]["data"])


def test_diverged_ranks_fail_loudly():
    assert agreed_checksum(["ab" * 32] * 3, step=7) == "ab" * 32
    with pytest.raises(SlmError, match="ranks diverged by step 7.*rank 1: cdcdcdcdcdcd"):
        agreed_checksum(["ab" * 32, "cd" * 32], step=7)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_default_output_in_a_terminal(data_root, tmp_path):
    """Without --quiet, in a terminal (a pty): the rich progress bar, one line per evaluation,
    the closing summary, and nothing else."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    args = [a for a in small(data_root, tmp_path / "run", "--max-iters", "4", "--eval-interval", "2")
            if a != "--quiet"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, env=ENV, cwd=ROOT)
    os.close(slave)
    chunks, deadline = [], time.time() + 120
    while time.time() < deadline:
        if select.select([master], [], [], 1.0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child has exited and closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=30) == 0
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert re.search(r"step\s+4/4 ━+ loss \d+\.\d{4} \| lr [\d.e+-]+ \| [\d,]+ tok/s", screen), screen
    assert "ETA" in screen
    evaluations = re.findall(r"step +(\d+) \| train \d+\.\d+ \| val \d+\.\d+ \(ppl", screen)
    assert evaluations == ["0", "2", "4"], screen
    assert re.search(r"done: step 4, val loss \d+\.\d+, best \d+\.\d+; weights .*best\.pt", screen)
    assert "warning" not in screen and "Traceback" not in screen


def test_ctrl_c_saves_checkpoint_and_exits_130(data_root, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                             *small(data_root, out, "--max-iters", "100000", "--eval-interval", "2")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=ROOT)
    deadline = time.time() + 90
    while not (out / "metrics.jsonl").exists() or len(metrics(out)) < 2:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "--resume" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    step = checkpoint.load(out / "ckpt.pt")["step"]
    assert 2 <= step < 100000


@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--max-iters", "-1"], "--max-iters"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], "min-lr"),
    (["--device", "gpu"], "--device"),
    (["--val-fraction", "1"], "--val-fraction"),
])
def test_bad_flags_are_one_line_exit_2_in_process(data_root, tmp_path, capsys, args, needle):
    try:  # argparse exits through SystemExit(2); SlmError comes back as the return code 2
        code = main(small(data_root, tmp_path / "run", "--max-iters", "1", *args))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case,args,needle", [
    ("resume", ["--resume"], "no checkpoint"),
    ("missing", ["--init-from", "nope/best.pt"], "not found"),
    ("corrupt", ["--init-from", "CORRUPT"], "corrupt"),
    ("hub", ["--dataset", "roneneldan/TinyStories"], "roneneldan/TinyStories"),
])
def test_bad_inputs_are_one_line_exit_2(data_root, tmp_path, case, args, needle):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    args = [str(bad) if a == "CORRUPT" else a for a in args]
    r = run_cli(small(data_root, tmp_path / "run", "--max-iters", "1", *args))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_resume_with_another_model_config_is_refused(data_root, tmp_path):
    out = tmp_path / "run"
    assert main(small(data_root, out, "--max-iters", "1")) == 0
    before = (out / "ckpt.pt").read_bytes()
    r = run_cli(small(data_root, out, "--resume", "--max-iters", "2", "--n-embd", "64"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "model with config" in r.stderr
    r = run_cli(small(data_root, out, "--max-iters", "2"))  # a fresh run must not clobber it
    assert r.returncode == 2 and "--resume" in r.stderr
    assert (out / "ckpt.pt").read_bytes() == before


def test_resume_keeps_the_runs_own_dataset(tmp_path):
    """A run on a local file resumes on that file when --dataset is not repeated."""
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"The red fox ran to the hill {i} times."}) + "\n"
                              for i in range(200)))
    run, root = tmp_path / "run", tmp_path / "data"
    flags = [a for a in SMALL if a not in ("--stories", "300")] + ["--val-fraction", "0.1"]
    assert main([*flags, "--dataset", str(corpus), "--data-root", str(root), "--out-dir", str(run),
                 "--max-iters", "2", "--eval-interval", "2"]) == 0
    assert main([*flags, "--data-root", str(root), "--out-dir", str(run), "--resume",
                 "--max-iters", "4", "--eval-interval", "2"]) == 0
    assert [m["step"] for m in metrics(run)] == [0, 2, 4]
    assert checkpoint.load(run / "ckpt.pt")["train_config"]["dataset"] == str(corpus)
    assert not any(p.name.startswith("stories") for p in root.iterdir())  # never built stories


# -- every train.py flag, through the command line ---------------------------------------------

FLAG_RUNS = {  # run name -> flags beyond SMALL; "base" clips nothing and decays nothing
    "base": [],
    "seed 42 again": ["--seed", "42"],
    "seed 7": ["--seed", "7"],
    "clip 1e9": ["--grad-clip", "1e9"],
    "clip 1e-3": ["--grad-clip", "1e-3"],
    "weight decay 0.5": ["--weight-decay", "0.5"],
    "dropout 0.2": ["--dropout", "0.2"],
    "bf16": ["--dtype", "bf16"],
    "accum 2 x batch 2": ["--grad-accum", "2", "--batch-size", "2"],
}


@pytest.fixture(scope="module")
def flag_runs(data_root, tmp_path_factory) -> dict[str, Path]:
    """One 3-step run per FLAG_RUNS entry (about 2 s each), shared by the flag tests."""
    out = tmp_path_factory.mktemp("flags")
    runs = {}
    for name, flags in FLAG_RUNS.items():
        run = out / name.replace(" ", "_")
        assert main(small(data_root, run, "--max-iters", "3", "--eval-interval", "3", "--lr", "3e-3",
                          "--warmup-iters", "1", "--grad-clip", "0", "--weight-decay", "0",
                          *flags)) == 0, name
        runs[name] = run
    return runs


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run / "ckpt.pt")["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = final_weights(a), final_weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def test_flag_seed_same_seed_same_run_other_seed_other_run(flag_runs):
    base, again, other = (metrics(flag_runs[k]) for k in ("base", "seed 42 again", "seed 7"))
    assert base == [{**m, "tokens_per_s": b["tokens_per_s"], "elapsed_s": b["elapsed_s"]}
                    for m, b in zip(again, base, strict=True)]  # identical but for timings
    assert same_weights(flag_runs["base"], flag_runs["seed 42 again"])
    assert all(m["val_loss"] != b["val_loss"] for m, b in zip(other, base, strict=True))
    assert not same_weights(flag_runs["base"], flag_runs["seed 7"])  # other weights, data order
    ckpt = checkpoint.load(flag_runs["seed 7"] / "ckpt.pt")
    assert ckpt["train_config"]["seed"] == 7


def test_flag_grad_clip_zero_disables_clipping(flag_runs):
    assert same_weights(flag_runs["base"], flag_runs["clip 1e9"])  # 0 = never clipped
    assert not same_weights(flag_runs["base"], flag_runs["clip 1e-3"])
    tiny = checkpoint.load(flag_runs["clip 1e-3"] / "ckpt.pt")
    assert tiny["train_config"]["grad_clip"] == 1e-3
    # clipped to a norm of 1e-3, Adam's first steps barely differ in size but the weights moved
    assert metrics(flag_runs["clip 1e-3"])[-1]["val_loss"] != metrics(flag_runs["base"])[-1]["val_loss"]


def test_flag_weight_decay_shrinks_matrices_only(flag_runs):
    ckpt = checkpoint.load(flag_runs["weight decay 0.5"] / "ckpt.pt")
    assert [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]] == [0.5, 0.0]
    decayed, base = final_weights(flag_runs["weight decay 0.5"]), final_weights(flag_runs["base"])
    key = "transformer.h.0.mlp.c_fc.weight"
    assert decayed[key].norm() < base[key].norm()


def test_flag_dropout_reaches_the_model(flag_runs):
    ckpt = checkpoint.load(flag_runs["dropout 0.2"] / "ckpt.pt")
    assert ckpt["model_config"]["dropout"] == 0.2
    base = metrics(flag_runs["base"])
    dropped = metrics(flag_runs["dropout 0.2"])
    assert dropped[0]["val_loss"] == base[0]["val_loss"]  # same initial weights, eval mode
    assert dropped[-1]["val_loss"] != base[-1]["val_loss"]  # trained with masks


def test_flag_dtype_bf16_on_cpu(flag_runs):
    bf16, base = metrics(flag_runs["bf16"]), metrics(flag_runs["base"])
    assert checkpoint.load(flag_runs["bf16"] / "ckpt.pt")["train_config"]["dtype"] == "bf16"
    assert all(v.dtype == torch.float32 for v in final_weights(flag_runs["bf16"]).values())
    for a, b in zip(bf16, base, strict=True):  # bf16 autocast: close to fp32, not equal
        assert a["val_loss"] != b["val_loss"] and abs(a["val_loss"] - b["val_loss"]) < 0.05


def test_flag_grad_accum_equals_a_bigger_batch(flag_runs):
    """2 micro-batches of 2 draw the same windows as one batch of 4 (one generator, drawn in
    order), and their mean gradient is the batch of 4's."""
    accum = checkpoint.load(flag_runs["accum 2 x batch 2"] / "ckpt.pt")
    assert accum["train_config"]["grad_accum"] == 2 and accum["train_config"]["batch_size"] == 2
    base = final_weights(flag_runs["base"])
    for k, v in accum["model"].items():
        torch.testing.assert_close(v, base[k], atol=2e-5, rtol=0, msg=k)


def test_flag_text_field_template(tmp_path):
    corpus = tmp_path / "talks.jsonl"
    rows = [{"Context": f"I lost my red ball {i}.", "Response": f"Let us look under the bed {i}."}
            for i in range(120)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run, root = tmp_path / "run", tmp_path / "data"
    flags = [a for a in SMALL if a not in ("--stories", "300")]
    assert main([*flags, "--dataset", str(corpus), "--text-field", "{Context}\n{Response}",
                 "--val-fraction", "0.1", "--data-root", str(root), "--out-dir", str(run),
                 "--max-iters", "2"]) == 0
    ckpt = checkpoint.load(run / "ckpt.pt")
    assert ckpt["train_config"]["text_field"] == "{Context}\n{Response}"
    meta = ckpt["data_meta"]
    expected = sum(len(tokenizer.encode(f"{r['Context']}\n{r['Response']}")) + 1 for r in rows)
    assert meta["text_field"] == "{Context}\n{Response}"
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == expected


# -- CUDA only (skipped on CPU machines) --------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU; on CPU the same code paths are tested "
                                       "with CPU tensors and mocked device capabilities")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_mixed_precision_training_smoke(data_root, tmp_path, dtype):
    """fp16 trains with a GradScaler (its state goes into ckpt.pt), bf16 without one; both
    learn, keep fp32 weights, and resume."""
    if dtype == "bf16" and devices.bf16_support(torch.device("cuda")) == "none":
        pytest.skip("this GPU has no bfloat16")
    run = tmp_path / dtype
    flags = ["--device", "cuda", "--dtype", dtype, "--eval-interval", "3", "--lr", "3e-3",
             "--warmup-iters", "1"]
    assert main(small(data_root, run, *flags, "--max-iters", "6")) == 0
    ckpt = checkpoint.load(run / "ckpt.pt")
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in ckpt["model"].values())
    if dtype == "fp16":
        assert ckpt["scaler"]["scale"] > 0  # GradScaler ran (and may have lowered its scale)
    else:
        assert not ckpt["scaler"]  # disabled: bf16 needs no loss scaling
    m = metrics(run)
    assert all(math.isfinite(r["val_loss"]) for r in m) and m[-1]["val_loss"] < m[0]["val_loss"]
    assert main(small(data_root, run, *flags, "--max-iters", "9", "--resume")) == 0
    assert checkpoint.load(run / "ckpt.pt")["step"] == 9


@pytest.mark.cuda
@needs_cuda
def test_cuda_batches_are_pinned_copies_of_the_cpu_windows(data_root):
    tokens = prepare(Source.of(stories=300), data_root).tokens("train")
    cpu = get_batch(tokens, 8, 32, torch.Generator().manual_seed(1))
    gpu = get_batch(tokens, 8, 32, torch.Generator().manual_seed(1), torch.device("cuda"))
    torch.cuda.synchronize()
    assert all(t.device.type == "cuda" for t in gpu)
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.equal(a, b.cpu())


@pytest.mark.cuda
@needs_cuda
def test_cuda_bf16_support_matches_the_compute_capability():
    device = torch.device("cuda")
    native = torch.version.hip or torch.cuda.get_device_capability(device) >= (8, 0)
    assert (devices.bf16_support(device) == "native") == bool(native)


@pytest.mark.cuda
@needs_cuda
def test_cuda_30m_recipe_step_fits_a_4gb_gpu():
    """One optimizer step of the 30m recipe (batch 32 x 128 tokens, autocast as chosen for
    this GPU) allocates well under 4 GB: the chunked loss never holds the 32x128x50257 logits."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    gpt = GPT(PRESETS["30m"]).to(device)
    precision = select_precision("cuda", "auto", devices.bf16_support(device))
    opt = optim.make_optimizer(gpt, lr=5e-4, weight_decay=0.1, device_type="cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=precision.use_scaler)
    x = torch.randint(0, 50257, (32, 128), device=device)
    y = torch.randint(0, 50257, (32, 128), device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # the second step has the optimizer state allocated
        loss = forward_backward(NextTokenLoss(gpt), [(x, y)], precision, "cuda",
                                scaler if precision.use_scaler else None)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    assert math.isfinite(loss.item())
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
    assert peak_gb < 3.0, f"peak {peak_gb:.2f} GB"


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank (what a DDP run's collectives need)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_stop_vote_is_summed_and_read_a_step_later(one_rank_group):
    from slm_export.training import StopVote

    assert StopVote(True, torch.device("cpu")).read() is True
    assert StopVote(False, torch.device("cpu")).read() is False


@pytest.mark.cuda
def test_the_stop_vote_on_cuda_waits_for_its_copy_only(tmp_path):
    """On a GPU the vote comes back through pinned memory and an event (no stream sync)."""
    import torch.distributed as dist

    from slm_export.training import StopVote

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        vote = StopVote(True, torch.device("cuda"))
        assert vote.host.is_pinned() and vote.event is not None and vote.read() is True
    finally:
        dist.destroy_process_group()
