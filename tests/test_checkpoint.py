import os
import pickle

import pytest
import torch

from slm_export import checkpoint
from slm_export.artifacts.files import atomic_write
from slm_export.config import PRESETS, GPTConfig
from slm_export.errors import SlmError
from slm_export.model import GPT


def test_round_trip(tiny_ckpt, tiny_model):
    model, ckpt = checkpoint.load_model(tiny_ckpt)
    assert ckpt["kind"] == "weights" and ckpt["tokenizer"] == "gpt2"
    assert model.config == tiny_model.config and not model.training
    idx = torch.randint(0, 50257, (1, 9))
    torch.testing.assert_close(model(idx)[0], tiny_model(idx)[0])


def test_missing_empty_truncated(tmp_path, tiny_ckpt):
    with pytest.raises(SlmError, match="not found"):
        checkpoint.load(tmp_path / "nope.pt")
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(SlmError, match="empty"):
        checkpoint.load(empty)
    cut = tmp_path / "cut.pt"
    data = open(tiny_ckpt, "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlmError, match="truncated or corrupt"):
        checkpoint.load(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(SlmError, match="corrupt"):
        checkpoint.load(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(SlmError, match="not an slm-export checkpoint"):
        checkpoint.load(other)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED_MARKER']}",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "version": 1, "kind": "weights",
                "model_config": {}, "model": _Payload()}, evil)
    assert not marker.exists()
    with pytest.raises(SlmError, match="refusing to load"):
        checkpoint.load(evil)
    assert not marker.exists()  # the payload did not execute
    # sanity: an unrestricted unpickle of the same bytes would have run it
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_Payload()))
    pickle.loads(plain.read_bytes())
    assert marker.exists()


def test_checkpoint_from_another_config(tmp_path):
    small = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32))
    payload = checkpoint.weights_payload(small, small.config)
    payload["model_config"] = PRESETS["tiny"].to_dict()  # lies about its shape
    path = tmp_path / "mismatch.pt"
    checkpoint.save(payload, path)
    with pytest.raises(SlmError, match="do not match its model config"):
        checkpoint.load_model(path)


def test_failed_write_keeps_previous_file(tmp_path, tiny_model):
    path = tmp_path / "best.pt"
    checkpoint.save(checkpoint.weights_payload(tiny_model, tiny_model.config, step=1), path)
    before = path.read_bytes()

    def disk_full(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, disk_full)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temp file left behind
    assert checkpoint.load(path)["step"] == 1


def test_leftovers_of_killed_writers_are_removed(tmp_path, tiny_model):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # a process that has exited: its temp file is stale
    path = tmp_path / "ckpt.pt"
    stale = tmp_path / f".ckpt.pt.tmp{dead_pid}"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".ckpt.pt.tmp{os.getppid()}"  # a writer that is still running
    live.write_bytes(b"in progress")
    checkpoint.save(checkpoint.weights_payload(tiny_model, tiny_model.config), path)
    assert not stale.exists() and live.exists()
    assert checkpoint.load(path)["kind"] == "weights"
