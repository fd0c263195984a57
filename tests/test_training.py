"""The trainer: schedule, optimizer groups, precision choice, accumulation, checkpoints, resume,
DDP on CPU, Ctrl-C and error paths, mostly through the `train.py` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slm_export import checkpoint, optim
from slm_export.cli.train import main
from slm_export.config import RECIPE_FIELDS, GPTConfig, TrainConfig, recipe
from slm_export.data import Source, prepare
from slm_export.devices import resolve_device
from slm_export.errors import SlmError
from slm_export.model import GPT
from slm_export.training import (
    agreed_checksum,
    forward_backward,
    param_checksum,
    select_precision,
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
    prepare(Source(stories=300), root)
    return root


def small(data_root: Path, out: Path, *extra: str) -> list[str]:
    return [*SMALL, "--data-root", str(data_root), "--out-dir", str(out), *extra]


def run_cli(args: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout, cwd=kw.get("cwd", ROOT))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


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
    ("cpu", "auto", False, torch.float32, False),
    ("cpu", "bf16", False, torch.bfloat16, False),
    ("cpu", "fp32", False, torch.float32, False),
    ("cuda", "auto", True, torch.bfloat16, False),
    ("cuda", "auto", False, torch.float16, True),
    ("cuda", "fp16", True, torch.float16, True),
    ("cuda", "fp32", True, torch.float32, False),
])
def test_select_precision(device, requested, bf16, dtype, scaler):
    p = select_precision(device, requested, bf16)
    assert (p.dtype, p.use_scaler) == (dtype, scaler)


@pytest.mark.parametrize("device,requested,bf16", [("cpu", "fp16", False), ("cuda", "bf16", False)])
def test_select_precision_refuses_what_cannot_work(device, requested, bf16):
    with pytest.raises(SlmError):
        select_precision(device, requested, bf16)


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
    """Source's defaults are TrainConfig's; the 30m recipe is TrainConfig's defaults."""
    assert (Source.text_field, Source.stories, Source.val_fraction) == \
        (TrainConfig.text_field, TrainConfig.stories, TrainConfig.val_fraction)
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
    loss_k = forward_backward(a, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], fp32, "cpu")
    loss_1 = forward_backward(b, [(x, y)], fp32, "cpu")
    assert loss_k == pytest.approx(loss_1, abs=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-4, msg=name)


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


@pytest.mark.slow  # torch.compile's first build takes ~1 minute on 2 CPU cores
def test_compile_keeps_checkpoint_keys_clean(data_root, tmp_path):
    out = tmp_path / "compiled"
    assert main(small(data_root, out, "--compile", "--max-iters", "1")) == 0
    ckpt = checkpoint.load(out / "ckpt.pt")
    assert ckpt["step"] == 1 and "transformer.wte.weight" in ckpt["model"]
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])


def test_ddp_two_processes_on_cpu_stay_in_sync(data_root, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", str(ROOT / "train.py"),
           *small(data_root, tmp_path / "ddp", "--max-iters", "4", "--grad-accum", "2",
                  "--eval-interval", "2", "--device", "cpu")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
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
