"""Shared fixtures. Tests run offline: the hub is never contacted."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from slm_export import checkpoint  # noqa: E402
from slm_export.config import PRESETS  # noqa: E402
from slm_export.model import GPT  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where torch sees a GPU and skip elsewhere, with the reason
    (`pytest -m cuda` lists them all; scripts/gpu-check.sh runs them on a GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model() -> GPT:
    """The `tiny` architecture with seeded random weights, in eval mode."""
    torch.manual_seed(1234)
    return GPT(PRESETS["tiny"]).eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_model) -> str:
    """A `weights` checkpoint (best.pt format) of `tiny_model`."""
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    checkpoint.save(checkpoint.weights_payload(tiny_model, tiny_model.config, step=0), path)
    return str(path)


TRAINED_STEPS = 150


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory) -> str:
    """The tiny preset trained briefly on the embedded stories through train.py: a model
    whose greedy text is varied English-like stories (random weights repeat one token,
    which every backend agrees on and proves little). ~1-2 minutes on 2 cores."""
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path_factory.mktemp("trained")
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "train.py"), "--dataset", "stories", "--stories", "2000",
           "--preset", "tiny", "--max-iters", str(TRAINED_STEPS), "--eval-interval",
           str(TRAINED_STEPS), "--eval-iters", "2", "--no-plots", "--quiet",
           "--out-dir", str(root / "run"), "--data-root", str(root / "data")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(root / "run" / "best.pt")
