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
