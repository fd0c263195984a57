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


@pytest.fixture(scope="session")
def trained_data(trained_ckpt):
    """The prepared data folder ``trained_ckpt`` trained on (read-only)."""
    from pathlib import Path

    (folder,) = (Path(trained_ckpt).parents[1] / "data").glob("stories-*")
    return folder


@pytest.fixture(scope="session")
def trained_model(trained_ckpt) -> GPT:
    """``trained_ckpt``'s GPT, in eval mode on the CPU."""
    model, _ = checkpoint.load_model(trained_ckpt)
    return model


@pytest.fixture(scope="session")
def trained_export(trained_ckpt, tmp_path_factory):
    """The one export of the trained model per session, through export.py's main, verified
    (the default formats: ONNX, TorchScript and, where a C++ compiler is found, AOTInductor;
    int8, int4 and fp16 variants: each passes its default quality gate).
    Read-only: a test that changes files works on a copy."""
    from pathlib import Path

    from slm_export.cli.export import main

    folder = Path(tmp_path_factory.mktemp("trained_export")) / "export"
    assert main(["--checkpoint", trained_ckpt, "--out-dir", str(folder), "--quantize", "int8",
                 "--quantize", "int4", "--dtype", "fp16"]) == 0
    return folder


@pytest.fixture(scope="session")
def trained_backends(trained_model, trained_export) -> dict:
    """Every backend on the trained model, made once per session (so ``compiled`` compiles
    once): eager, naive, compiled, torchscript, ort."""
    from slm_export.runtime import backend_for_model, load_backend

    made = {name: backend_for_model(name, trained_model) for name in ("eager", "naive", "compiled")}
    made.update({name: load_backend(name, trained_export) for name in ("torchscript", "ort")})
    return made


REL_TOL = 5e-5  # fp32 backends: max |logit difference| / std of the reference's logits


def greedy_lockstep(reference, backend, prompts, *, max_new_tokens: int, overflow: str = "rebase",
                    rel_tol: float | None = REL_TOL) -> dict:
    """Greedy through the one loop on ``backend`` with ``reference`` fed the same ids in
    lockstep (``verify.Lockstep``). Asserts, at every step of the whole continuation: the
    logits agree within ``rel_tol`` x the std of the reference's logits (None: not checked),
    and the token is the reference's argmax, or the reference scores both within that
    tolerance (a tie: float noise may pick either; the reference follows the backend).
    Without ties the text is exactly the reference's own.
    -> {"generation": the backend's ``Generation``, "ties": per row, the first token picked at
    a tie (None: none; up to there the row is the reference's own greedy text), "agreement":
    the share of tokens that are the reference's argmax}."""
    from slm_export.export.verify import Lockstep
    from slm_export.runtime import GREEDY, generate

    pair = Lockstep(backend, reference)
    out = generate(pair, prompts, max_new_tokens=max_new_tokens, sampling=GREEDY,
                   overflow=overflow, stop_id=None)
    assert len(pair.steps) == max_new_tokens
    for token, step in enumerate(pair.steps):
        if rel_tol is not None:
            tol = rel_tol * step.scale
            assert step.diff <= tol, f"token {token}: max |diff| {step.diff:.3g} > {tol:.3g}"
            assert bool((step.gap <= tol).all()), f"token {token}: not a tie: {step.gap.max():.3g}"
    agree = torch.stack([step.agree for step in pair.steps])  # (tokens, rows)
    ties = [None if bool(col.all()) else int(col.logical_not().nonzero()[0]) for col in agree.T]
    return {"generation": out, "ties": ties, "agreement": agree.float().mean().item()}


@pytest.fixture(scope="session")
def lockstep():
    """``greedy_lockstep``: tie-aware greedy parity of a backend with a reference."""
    return greedy_lockstep
