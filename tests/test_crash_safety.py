"""Crash safety: `train.py` killed with SIGKILL at seeded kill points, then resumed.

Each kill point is one run of the real trainer in a subprocess. A small hook (``HOOK`` below,
run as the child's ``-c`` program before the real ``train.py`` main) marks named moments:
entering tokenization, a ``.bin`` / ``meta.json`` / ``ckpt.pt`` / ``best.pt`` file fully
written under its temporary name but not yet renamed (``<name>``) or just renamed
(``<name>:done``), and entering an evaluation. The moment chosen for a run (and which
occurrence of it, seeded) parks the child there; the test then SIGKILLs it. "timer" kill
points park nowhere: their seeded delay starts when the child marks that data preparation
("timer:data") or training ("timer:train", its first optimizer step) has started, and they
land wherever the child is then. The hook also keeps the child's current phase in a file
(``startup``, ``data``, ``data:tokenize``, ``data:write train.bin``, ``setup``, ``train``,
``train:step``, ``train:eval``, ``train:write ckpt.pt``, ...), so each kill is logged with
the phase it hit, and the phases covered are asserted.

After every kill: the last ``ckpt.pt`` loads with ``checkpoint.load`` and its step never goes
back, ``best.pt`` exists beside it and is at least as good as the ckpt says, the data folder
either looks incomplete (no ``meta.json``, so it is rebuilt) or is complete and valid, and
``metrics.jsonl`` is valid JSON with strictly increasing steps no later than the checkpoint.
The next run resumes (``--resume``, or starts fresh when no ckpt exists yet), and a last run
finishes training from the last saved step.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slm_export import checkpoint
from slm_export.data import Source, TokenData

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

ROOT = Path(__file__).resolve().parents[1]
SEED = 20240611
STORIES = 300
EVAL_INTERVAL = 3
FLAGS = ["--preset", "tiny", "--stories", str(STORIES), "--block-size", "32", "--n-layer", "1",
         "--n-head", "2", "--n-embd", "16", "--batch-size", "2", "--eval-iters", "1",
         "--eval-interval", str(EVAL_INTERVAL), "--lr", "3e-3", "--warmup-iters", "2",
         "--lr-decay-iters", "1000", "--device", "cpu", "--no-plots", "--quiet"]

HOOK = r"""
import os, sys, time
from pathlib import Path
event, _, nth = os.environ.get("KILL_AT", "").partition("#")
marker = Path(os.environ["KILL_MARKER"])
phase_fd = os.open(os.environ["KILL_PHASE"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
phases, seen = ["startup"], {}

def show():  # the current phase, fixed width at offset 0: what a SIGKILL interrupts
    os.pwrite(phase_fd, phases[-1].encode().ljust(64), 0)

def started(what):  # a "timer:<what>" kill point starts counting here
    Path(f"{marker}.{what}").touch()

def hit(name):
    seen[name] = seen.get(name, 0) + 1
    if name == event and seen[name] == int(nth):
        marker.write_text(name)
        time.sleep(600)  # parked here until the test kills us

def in_phase(name, fn, before=None, after=None):
    def wrapped(*a, **k):
        phases.append(name(*a) if callable(name) else name)
        show()
        if before:
            before()
        try:
            return fn(*a, **k)
        finally:
            phases.pop()
            if after:
                after()
            show()
    return wrapped

show()
from slm_export import checkpoint, data, training

def base(name):
    phases[0] = name

def hooked_atomic_write(orig):
    def atomic_write(path, write):
        def write_then_park(f):
            write(f)
            f.flush()
            hit(Path(path).name)  # complete under the temporary name, not yet renamed
        orig(path, write_then_park)
        hit(Path(path).name + ":done")
    where = lambda path, write: f"{phases[-1].split(':')[0]}:write {Path(path).name}"
    return in_phase(where, atomic_write)

checkpoint.atomic_write = hooked_atomic_write(checkpoint.atomic_write)
data.atomic_write = hooked_atomic_write(data.atomic_write)
data._write_split = in_phase("data:tokenize", data._write_split, lambda: hit("tokenize"))
training.prepare = in_phase("data", training.prepare, lambda: started("data"),
                            lambda: base("setup"))
training.evaluate = in_phase("train:eval", training.evaluate, lambda: hit("eval"))
training.forward_backward = in_phase(
    "train:step", training.forward_backward, lambda: base("train") or started("train"))
from slm_export.cli.train import main
raise SystemExit(main(sys.argv[1:]))
"""

# The data folder is built once, so its kill points come first and in order: each run
# rebuilds the folder and dies one moment later.
DATA_POINTS = ["timer:data", "tokenize", "train.bin", "val.bin", "meta.json"]
TRAIN_POINTS = ["eval", "eval", "ckpt.pt", "ckpt.pt:done", "best.pt", "best.pt:done",
                "timer:train", "timer:train"]
# The phase each kind of kill point must hit (a regular expression); ckpt.pt and best.pt are
# first written in "setup", after the step-0 evaluation and before the first step.
EXPECTED_PHASE = {"timer:data": r"data(:.+)?", "tokenize": r"data:tokenize",
                  "train.bin": r"data:write train\.bin", "val.bin": r"data:write val\.bin",
                  "meta.json": r"data:write meta\.json", "eval": r"train:eval",
                  "timer:train": r"train(:.+)?", "ckpt.pt": r"(setup|train):write ckpt\.pt",
                  "ckpt.pt:done": r"(setup|train):write ckpt\.pt",
                  "best.pt": r"(setup|train):write best\.pt",
                  "best.pt:done": r"(setup|train):write best\.pt"}


def plan(rng: random.Random) -> list[tuple[str, int | float]]:
    """(kill point, nth occurrence in that run, or seconds after its start for a timer), seeded."""
    points: list[tuple[str, int | float]] = [("timer:data", rng.uniform(0.05, 0.5))]
    points += [(name, 1) for name in DATA_POINTS[1:]]
    points.append(("eval", 2))  # the first run dies between its step-0 and next checkpoint
    train = TRAIN_POINTS[:]
    rng.shuffle(train)
    for name in train:
        if name.startswith("timer"):
            points.append((name, rng.uniform(0.05, 2.0)))
        else:  # best.pt is written only on improvement: ask for an early one
            points.append((name, rng.randint(1, 2 if name.startswith("best") else 3)))
    return points


def check_state(out: Path, data_dir: Path, last_step: int) -> int:
    """Invariants after a kill; -> the step of the last checkpoint (-1 without one)."""
    if (data_dir / "meta.json").exists():
        TokenData(data_dir).verify_checksums()  # complete means valid
    ckpt_path = out / "ckpt.pt"
    if not ckpt_path.exists():
        assert last_step == -1, "the checkpoint disappeared"
        assert not (out / "best.pt").exists()
        return -1
    ckpt = checkpoint.load(ckpt_path)
    assert ckpt["kind"] == "train" and ckpt["step"] >= last_step
    best = checkpoint.load(out / "best.pt")  # a run with a ckpt always has its best weights
    assert best["val_loss"] <= ckpt["best_val_loss"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    assert steps == sorted(set(steps)), f"metrics steps repeat or go back: {steps}"
    assert not steps or steps[-1] <= ckpt["step"]
    return ckpt["step"]


def launch(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOOK, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_and_kill(proc: subprocess.Popen, point: str, arg, marker: Path) -> None:
    """Park at ``point`` (its ``arg``-th occurrence), or for a timer wait for its start marker
    and then ``arg`` seconds; then SIGKILL. Fails if the child ended or never got there."""
    deadline = time.monotonic() + 120
    wait_for = Path(f"{marker}.{point.split(':')[1]}") if point.startswith("timer") else marker
    while proc.poll() is None and time.monotonic() < deadline and not wait_for.exists():
        time.sleep(0.01)
    if point.startswith("timer") and wait_for.exists():
        time.sleep(arg)
    exited = proc.poll()
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert exited is None, f"{point}#{arg}: the run ended by itself ({exited}): {err[-2000:]}"
    assert wait_for.exists(), f"{point}#{arg} was never reached: {err[-2000:]}"


def test_sigkill_at_seeded_moments_then_resume(tmp_path):
    rng = random.Random(SEED)
    data_root, out = tmp_path / "data", tmp_path / "run"
    data_dir = data_root / Source.of(stories=STORIES).name
    marker, phase_file = tmp_path / "marker", tmp_path / "phase"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT),
           "KILL_MARKER": str(marker), "KILL_PHASE": str(phase_file)}
    base = [*FLAGS, "--data-root", str(data_root), "--out-dir", str(out)]
    last_step, hits = -1, []
    for point, arg in plan(rng):
        for stale in (marker, Path(f"{marker}.data"), Path(f"{marker}.train")):
            stale.unlink(missing_ok=True)
        resume = ["--resume"] if last_step >= 0 else []
        kill_at = "" if point.startswith("timer") else f"{point}#{arg}"
        proc = launch([*base, *resume, "--max-iters", "100000"], {**env, "KILL_AT": kill_at})
        wait_and_kill(proc, point, arg, marker)
        phase = phase_file.read_text().strip()
        hits.append((f"{point}+{arg:.2f}s" if point.startswith("timer") else f"{point}#{arg}", phase))
        last_step = check_state(out, data_dir, last_step)

    # The last run resumes from the last saved step and finishes.
    final = last_step + 2 * EVAL_INTERVAL
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *base,
                        *(["--resume"] if last_step >= 0 else []), "--max-iters", str(final)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert check_state(out, data_dir, last_step) == final
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in records][-2:] == [final - EVAL_INTERVAL, final]
    assert all(math.isfinite(m["val_loss"]) for m in records)
    assert last_step > 0, "no kill point landed after training had started"
    TokenData(data_dir).verify_checksums()
    print(f"\ncrash safety: {len(hits)} SIGKILLs (point -> phase hit): "
          + ", ".join(f"{p} -> {ph}" for p, ph in hits))
    assert len(hits) == len(DATA_POINTS) + 1 + len(TRAIN_POINTS)
    for point, phase in hits:
        assert re.fullmatch(EXPECTED_PHASE[re.split(r"[#+]", point)[0]], phase), (point, phase)
    assert {"data:tokenize", "data:write train.bin", "data:write val.bin", "data:write meta.json",
            "train:eval"} <= {phase for _, phase in hits}


def test_full_disk_while_training_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    """ENOSPC in the trainer's second ckpt.pt write: one line, exit 2, step-0 ckpt.pt intact."""
    import torch

    from slm_export.cli.train import main

    real_save, writes = torch.save, []

    def save(obj, f, *a, **k):
        if ".ckpt.pt.tmp" in str(getattr(f, "name", "")):
            writes.append(obj.get("step"))
            if len(writes) == 2:
                f.write(b"partial")
                raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    argv = [*FLAGS, "--data-root", str(tmp_path / "data"), "--out-dir", str(out),
            "--max-iters", "6"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "ckpt.pt" in err[0], err
    monkeypatch.undo()
    assert writes == [0, EVAL_INTERVAL]
    assert checkpoint.load(out / "ckpt.pt")["step"] == 0
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
