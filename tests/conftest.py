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
