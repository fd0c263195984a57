"""ExecuTorch (export.py --format executorch, the executorch backend): the .pte files of the
session's export, verified and gated like the others, served through the one loop."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from slm_export.artifacts.manifest import Manifest
from slm_export.errors import SlmError
from slm_export.runtime import GREEDY, generate, load_backend
from slm_export.runtime import executorch as runtime_et
from slm_export.tokenizer import encode

pytestmark = [pytest.mark.slow, pytest.mark.skipif(runtime_et.problem() is not None,
                                                   reason=f"ExecuTorch: {runtime_et.problem()}")]
PROMPTS = ["Once upon a time, there was a little girl named Mia. Mia loved to",
           "Tom had a red ball.", "One day,"]


def test_the_export_holds_verified_pte_files(trained_export):
    m = Manifest.read(trained_export)  # every SHA-256 checked
    assert m.file("executorch_kv") == trained_export / "model_kv.pte"
    assert m.file("executorch_kv", "int8") == trained_export / "model_kv.int8.pte"
    assert m.files["model_kv.int8.pte"]["bytes"] < m.files["model_kv.pte"]["bytes"] / 1.5
    gate = m.data["verification"]["model_kv.int8.pte"]
    assert gate["verified"] and gate["providers"] == ["executorch (CPU)"]
    backend = load_backend("executorch", trained_export)
    assert backend.metadata["kind"] == "executorch_kv" and \
        json.loads(backend.metadata["model_config"]) == m.config.to_dict()


def test_greedy_parity_with_eager_ragged_batch_across_the_window(trained_backends, trained_export, lockstep):
    backend = load_backend("executorch", trained_export)
    rows = [encode(p) for p in PROMPTS]
    r = lockstep(trained_backends["eager"], backend, rows, max_new_tokens=150)
    assert r.generation.stats.prefills > 1 and len(set(r.generation.tokens[0])) > 10


def test_the_int8_file_agrees_with_eager(trained_backends, trained_export, lockstep):
    backend = load_backend("executorch", trained_export, variant="int8")
    r = lockstep(trained_backends["eager"], backend, [encode(p) for p in PROMPTS], max_new_tokens=64,
                 rel_tol=None)
    assert r.agreement >= 0.9, r.agreement


def test_generate_cli_with_the_executorch_backend(trained_export, trained_ckpt):
    from slm_export.cli.generate import main

    argv = ["--prompt", PROMPTS[1], "--greedy", "--no-stream", "--max-new-tokens", "40", "--device", "cpu"]
    outs = []
    for backend, model in (("executorch", trained_export), ("eager", trained_ckpt)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["--backend", backend, "--model", str(model), *argv]) == 0
        outs.append(out.getvalue())
    assert outs[0] == outs[1] and len(outs[0]) > len(PROMPTS[1])


def test_without_executorch_the_format_is_one_line(monkeypatch, tiny_ckpt, trained_export, capsys):
    from slm_export.cli import export as cli

    monkeypatch.setattr(runtime_et, "problem", lambda: "the executorch package is not installed (test)")
    assert cli.main(["--checkpoint", tiny_ckpt, "--format", "executorch"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --format executorch needs ExecuTorch: the executorch package is not installed (test)")
    with pytest.raises(SlmError, match="backend executorch: the executorch package"):
        load_backend("executorch", trained_export, "cpu")


def test_a_broken_program_is_one_line(tmp_path, trained_export):
    from slm_export.runtime.executorch import ExecutorchBackend

    bad = tmp_path / "model_kv.pte"
    bad.write_bytes(b"not a program")
    with pytest.raises(SlmError, match="cannot load ExecuTorch program"):
        ExecutorchBackend(bad, Manifest.read(trained_export, verify_hashes=False).config)
    torch.manual_seed(0)
    assert generate(load_backend("executorch", trained_export), [[1, 2]], max_new_tokens=2,
                    sampling=GREEDY, stop_id=None).stats.new_tokens == 2
