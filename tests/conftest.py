"""Shared fixtures. Tests run offline: the hub is never contacted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from slm_export import checkpoint  # noqa: E402
from slm_export.config import PRESETS  # noqa: E402
from slm_export.model import GPT  # noqa: E402
from slm_export.runtime import parity  # noqa: E402
from slm_export.runtime.parity import REL_TOL  # noqa: E402


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
TRAINED_STORIES = 2000


RUN_ENV = "SLM_TEST_RUN"  # a folder for the trained run (best.pt, export/, data/), kept after


def _run_root(tmp_path_factory) -> Path:
    """Where the session's trained run lives: ``$SLM_TEST_RUN`` (CI's quick bench reads the
    same run; a later session reuses a complete one made by the same source code), else a
    temporary folder."""
    import hashlib
    import shutil

    kept = os.environ.get(RUN_ENV)
    if not kept:
        return tmp_path_factory.mktemp("trained")
    root, package = Path(kept), Path(__file__).resolve().parents[1] / "slm_export"
    stamp = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(package.rglob("*.py")))).hexdigest()
    if not (root / "source.sha256").is_file() or (root / "source.sha256").read_text() != stamp:
        shutil.rmtree(root, ignore_errors=True)  # made by other code: not this code's run
        root.mkdir(parents=True)
        (root / "source.sha256").write_text(stamp)
    return root


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory) -> str:
    """The tiny preset trained briefly on the embedded stories (``training.train_brief``, as
    the bench's own models): a model whose greedy text is varied English-like stories
    (random weights repeat one token, which every backend agrees on and proves little)."""
    from slm_export.training import train_brief

    root = _run_root(tmp_path_factory)
    best = root / "run" / "best.pt"
    if best.is_file() and list((root / "data").glob("stories-*/meta.json")):
        return str(best)
    return str(train_brief("tiny", TRAINED_STEPS, root / "run", root / "data", stories=TRAINED_STORIES))


@pytest.fixture(scope="session")
def trained_data(trained_ckpt):
    """The prepared data folder ``trained_ckpt`` trained on (read-only)."""
    (folder,) = (Path(trained_ckpt).parents[1] / "data").glob("stories-*")
    return folder


@pytest.fixture(scope="session")
def trained_model(trained_ckpt) -> GPT:
    """``trained_ckpt``'s GPT, in eval mode on the CPU."""
    model, _ = checkpoint.load_model(trained_ckpt)
    return model


@pytest.fixture(scope="session")
def trained_export(trained_ckpt):
    """The one export of the trained model per session, through export.py's main, verified
    (the default formats: ONNX, TorchScript, and AOTInductor and ExecuTorch where a C++
    compiler and the edge extra are found; int8, int4, mixed and fp16 variants: each passes
    its default quality gate), in the run folder
    (``run/export``: a run folder the bench and slm-serve take as it is). Reused where
    ``$SLM_TEST_RUN`` holds a complete one. Read-only: a test that changes files works on a copy."""
    from slm_export.artifacts.manifest import Manifest
    from slm_export.cli.export import main
    from slm_export.registry import REDUCED

    folder = Path(trained_ckpt).parent / "export"
    try:
        manifest = Manifest.read(folder, verify_hashes=False)
        if os.environ.get(RUN_ENV) and all(manifest.has("onnx_kv", v) for v in REDUCED):
            return folder
    except Exception:
        pass  # none yet, or incomplete: export it
    assert main(["--checkpoint", trained_ckpt, "--out-dir", str(folder), "--quantize", "int8",
                 "--quantize", "int4", "--quantize", "mixed", "--dtype", "fp16"]) == 0
    return folder


@pytest.fixture(scope="session")
def trained_backends(trained_model, trained_export) -> dict:
    """Every backend on the trained model, made once per session (so ``compiled`` compiles
    once): eager, naive, compiled, torchscript, ort."""
    from slm_export.runtime import backend_for_model, load_backend

    made = {name: backend_for_model(name, trained_model) for name in ("eager", "naive", "compiled")}
    made.update({name: load_backend(name, trained_export) for name in ("torchscript", "ort")})
    return made


def greedy_lockstep(reference, backend, prompts, *, max_new_tokens: int, overflow: str = "rebase",
                    rel_tol: float | None = REL_TOL):
    """``runtime.parity.greedy``, checked (every step's logits within ``rel_tol`` x the std of
    the reference's, every token its argmax or a tie) unless ``rel_tol`` is None."""
    report = parity.greedy(reference, backend, prompts, max_new_tokens, overflow)
    assert sum(len(row) for row in report.agree) == len(prompts) * max_new_tokens
    if rel_tol is not None:
        report.check(rel_tol)
    return report


@pytest.fixture(scope="session")
def prompt_ids() -> list[list[int]]:
    """Ten story openings of different lengths, as token ids."""
    from slm_export.tokenizer import encode

    return [encode(p) for p in ("Once upon a time", "The little dog",
                                "Lily and Tom went to the park to play with a big red ball.", "One day,",
                                "Mom said",
                                "There was a tiny frog who lived in a pond near a very old tree. He liked",
                                "The sun", "Tim was sad because", "A", "In the forest there was a bear.")]


@pytest.fixture(scope="session")
def lockstep():
    """``greedy_lockstep``: tie-aware greedy parity of a backend with a reference."""
    return greedy_lockstep


@pytest.fixture(scope="session")
def serving():
    """``tests/helpers/server.serving``: a real slm-serve process on a free loopback port."""
    from helpers.server import serving

    return serving
