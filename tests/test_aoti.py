"""AOTInductor end to end on a trained tiny model (random weights repeat one token, which
proves little): ``--format aoti`` writes a verified ``model_kv.pt2``; the ``aoti`` backend
gives eager's greedy tokens (batch 1, ragged batch, across rebases, speculative verify
steps); and the C++ runner (``cpp/``), built once per session, prints Python's greedy tokens
for both ``model_kv.pt2`` and ``model_kv.ts``.

One AOTInductor compile of the tiny model per session (``aoti_export``); the runner builds in
a temporary folder, or in ``$SLM_CPP_BUILD_DIR`` when set (CI can cache that folder: a
rebuild with nothing changed takes a second).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from slm_export.artifacts.loaders import load_aoti
from slm_export.artifacts.manifest import Manifest
from slm_export.errors import SlmError
from slm_export.export.aoti import compiler_problem
from slm_export.inductor_cpu import cpp_gemm_available
from slm_export.runtime import GREEDY, generate, load_backend
from slm_export.runtime.speculative import NgramDrafter
from slm_export.tokenizer import EOT_ID, encode

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time, there was a little girl named Mia. Mia loved to",
           "Tom had a red ball.", "One day,"]
ONCE = [7454, 2402, 257, 640]  # "Once upon a time"
NO_COMPILER = compiler_problem()

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NO_COMPILER is not None, reason=f"AOTInductor: {NO_COMPILER}")]


@pytest.fixture(scope="module")
def aoti_export(trained_export):
    """The session's export of the trained tiny model: export.py's default formats include
    model_kv.pt2 where a C++ compiler is found (as here: the module is skipped otherwise)."""
    return trained_export


@pytest.fixture(scope="module")
def eager(trained_ckpt):
    return load_backend("eager", trained_ckpt)


@pytest.fixture(scope="module")
def aoti(aoti_export):
    return load_backend("aoti", aoti_export)


@pytest.fixture(scope="module")
def reference(eager):
    """Eager's greedy generation, computed once per (prompts, new tokens, stop id)."""
    done = {}

    def greedy(rows, new_tokens: int, stop_id: int | None = None):
        key = (tuple(map(tuple, rows)), new_tokens, stop_id)
        if key not in done:
            done[key] = generate(eager, rows, max_new_tokens=new_tokens, sampling=GREEDY,
                                 stop_id=stop_id)
        return done[key]

    return greedy


def test_package_is_verified_and_carries_its_metadata(aoti_export, trained_ckpt):
    folder = aoti_export
    assert (folder / "model_kv.pt2").is_file()
    m = Manifest.read(folder)  # every SHA-256 checked
    entry = m.files["model_kv.pt2"]
    assert (entry["kind"], entry["dtype"]) == ("aoti_kv", "fp32") and len(entry["sha256"]) == 64
    _, meta = load_aoti(folder / "model_kv.pt2")
    assert (meta["format"], meta["kind"], meta["tokenizer"]) == ("slm-export-export", "aoti_kv", "gpt2")
    assert json.loads(meta["model_config"]) == m.config.to_dict()
    assert meta["AOTI_DEVICE_KEY"] == "cpu" and "torch" in meta["versions"]


@pytest.mark.skipif(not cpp_gemm_available(), reason="inductor has no vector ISA on this CPU")
def test_package_multiplies_with_inductors_cpp_gemm_template(aoti_export):
    """On the CPU the package is compiled with inductor's C++ GEMM template (its decode steps
    multiply a few rows, where MKL's packed GEMM is slow), and frozen: the
    Linear weights are folded into the template's blocked copies, not also kept as they were
    (a compile with grad on kept them, which doubled the file)."""
    with zipfile.ZipFile(aoti_export / "model_kv.pt2") as package:  # torch < 2.7: one .cpp
        sources = [package.read(n).decode() for n in package.namelist() if n.endswith(".cpp")]
    assert sources and any("micro_gemm" in k for k in sources)
    assert not any("c_attn_weight" in k for k in sources)


def test_greedy_parity_with_eager_ragged_batch_across_rebases(reference, aoti):
    rows = [encode(p) for p in PROMPTS]
    kw = dict(max_new_tokens=180, sampling=GREEDY, stop_id=None)
    want = reference(rows, 180)
    got = generate(aoti, rows, **kw)
    assert len({tuple(r[:40]) for r in want.tokens}) == 3  # varied text, not one repeated token
    assert got.tokens == want.tokens and got.stats.prefills == want.stats.prefills > 1
    alone = generate(aoti, rows[1:2], **kw)
    assert alone.tokens[0] == reference(rows[1:2], 180).tokens[0]


def test_contract_k_tokens_every_position_and_rewind(reference, eager, aoti):
    rows = [encode(p) for p in PROMPTS]
    spec = generate(aoti, rows, max_new_tokens=180, sampling=GREEDY, stop_id=None,
                    drafter=NgramDrafter(), draft_tokens=4)
    assert spec.tokens == reference(rows, 180).tokens and spec.stats.accepted > 0
    ids = torch.tensor([encode("Tom had a red ball.")])
    new = torch.tensor([[262, 3290, 13]])
    with torch.inference_mode():
        _, s = aoti.prefill(ids, None)
        at_once, _ = aoti.forward(new, s)
        _, s = aoti.prefill(ids, None)
        _, s = aoti.forward(torch.tensor([[11, 11]]), s)  # a branch that is then dropped
        scored, s_scored = aoti.forward(new, aoti.rewind(s, ids.size(1)), every=True)
        _, s_eager = eager.prefill(ids, None)
        want, _ = eager.forward(new, s_eager, every=True)
    torch.testing.assert_close(scored, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(at_once, want[:, -1], atol=1e-4, rtol=0)
    assert s_scored.length == ids.size(1) + 3


def test_generate_cli_with_the_aoti_backend(aoti_export, trained_ckpt, capsys):
    from slm_export.cli.generate import main

    argv = ["--prompt", "Once upon a time", "--greedy", "--no-stream", "--max-new-tokens", "40",
            "--device", "cpu"]
    assert main(["--backend", "aoti", "--model", str(aoti_export), *argv]) == 0
    got = capsys.readouterr().out
    assert main(["--backend", "eager", "--model", trained_ckpt, *argv]) == 0
    assert got == capsys.readouterr().out and len(got) > 40


def test_a_broken_package_is_one_line(tmp_path):
    bad = tmp_path / "model_kv.pt2"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SlmError, match="cannot load AOTInductor package"):
        load_aoti(bad)


def _executorch() -> tuple[str, ...]:
    """The executorch format where its package is installed ("all" skips it otherwise)."""
    from slm_export.runtime import executorch

    return () if executorch.problem() else ("executorch",)


def test_export_cli_without_a_compiler(monkeypatch, capsys, tiny_ckpt):
    from slm_export.cli import export as cli
    from slm_export.export import aoti

    monkeypatch.setattr(aoti, "compiler_problem", lambda: "no working C++ compiler (test)")
    assert cli._available(cli.FORMATS["all"]) == ("onnx", "torchscript", *_executorch())
    assert capsys.readouterr().out == "skipping aoti (model_kv.pt2): no working C++ compiler (test)\n"
    assert cli.main(["--checkpoint", tiny_ckpt, "--format", "aoti"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --format aoti needs a C++ compiler: no working C++ compiler (test)"]


def test_a_cuda_package_needs_the_cuda_toolkit(monkeypatch, tmp_path, capsys):
    """AOTInductor compiles a CUDA package with the toolkit's nvcc and headers, which a driver
    and pip's CUDA runtime wheels lack: the check names the missing piece in one line, export.py
    --device cuda refuses aoti with it, and --format all leaves aoti out saying why."""
    from torch.utils import cpp_extension

    from slm_export.cli import export as cli
    from slm_export.export import aoti

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert "no CUDA toolkit found" in aoti.cuda_toolkit_problem()
    with pytest.raises(SlmError, match="--format aoti --device cuda needs the CUDA toolkit: no CUDA"):
        aoti.require("cuda")
    aoti.require("cpu")  # the CPU needs a C++ compiler only
    assert cli._available(cli.FORMATS["all"], torch.device("cuda")) == ("onnx", "torchscript",
                                                                          *_executorch())
    assert "skipping aoti (model_kv.pt2): no CUDA toolkit found" in capsys.readouterr().out
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    assert aoti.cuda_toolkit_problem() == f"the CUDA toolkit at {tmp_path} has no bin/nvcc: set " \
                                          "CUDA_HOME to a complete toolkit"
    for part in ("bin/nvcc", "include/cuda_runtime_api.h"):
        (tmp_path / part).parent.mkdir(exist_ok=True)
        (tmp_path / part).touch()
    assert aoti.cuda_toolkit_problem() is None


# -- the C++ runner -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def runner(tmp_path_factory) -> Path:
    """cpp/ built once per session against the installed torch's libtorch."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found: the C++ runner needs cmake and a C++ compiler (CI has both)")
    from slm_export.export.aoti import cuda_toolkit_problem

    if torch.version.cuda and (problem := cuda_toolkit_problem()):  # libtorch's CMake config needs it
        pytest.skip(f"torch {torch.__version__} is a CUDA build, whose CMake config needs the CUDA "
                    f"toolkit: {problem}")
    build = Path(os.environ.get("SLM_CPP_BUILD_DIR") or tmp_path_factory.mktemp("slm-run"))
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [["cmake", "-S", str(ROOT / "cpp"), "-B", str(build), *generator,
              "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
             ["cmake", "--build", str(build)]]
    start = time.perf_counter()
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    print(f"\nbuilt {build / 'slm-run'} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return build / "slm-run"


def run_runner(runner: Path, model: Path, ids: list[int], new_tokens: int, *flags: str) -> list[int]:
    proc = subprocess.run([str(runner), "--model", str(model), "--ids", ",".join(map(str, ids)),
                           "--max-new-tokens", str(new_tokens), *flags],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stderr
    return [int(t) for t in proc.stdout.strip().split(",") if t]


@pytest.mark.parametrize("file", ["model_kv.pt2", "model_kv.ts"])
def test_cpp_runner_prints_pythons_greedy_tokens(file, runner, aoti_export, reference):
    path = aoti_export / file
    want = reference([ONCE], 200, EOT_ID)  # the runner's default stop id, as generate.py's
    assert want.finish == ["eot"]
    assert run_runner(runner, path, ONCE, 200) == want.tokens[0]
    long = encode(" ".join(PROMPTS * 6))  # > 128 tokens: cropped, then re-prefilled at once
    assert len(long) > 128
    for ids, new in ((ONCE, 200), (long, 70)):  # 200 new tokens cross the window twice
        want = reference([ids], new)
        assert want.stats.prefills > 1 and len(set(want.tokens[0])) > 20
        assert run_runner(runner, path, ids, new, "--stop-id", "-1") == want.tokens[0]


def test_cpp_runner_errors_are_one_line(runner, tmp_path):
    proc = subprocess.run([str(runner), "--model", str(tmp_path / "x.onnx"), "--ids", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "must be a .pt2" in proc.stderr


@pytest.fixture(scope="module")
def cuda_package(trained_ckpt, tmp_path_factory):
    from slm_export.export import build

    folder = tmp_path_factory.mktemp("cuda-aoti") / "export"
    build(trained_ckpt, folder, formats=("aoti",), device="cuda")
    return folder


@pytest.mark.cuda
def test_cuda_package_parity(cuda_package, eager, lockstep):
    """On a GPU: a package compiled for CUDA serves eager's greedy tokens (ties aside)."""
    backend = load_backend("aoti", cuda_package, "cuda")
    rows = [encode(p) for p in PROMPTS]
    lockstep(eager, backend, rows, max_new_tokens=180, rel_tol=2e-4)
    with pytest.raises(SlmError, match="compiled for cuda"):
        load_backend("aoti", cuda_package, "cpu")


@pytest.mark.cuda
def test_cpp_runner_on_a_cuda_package(cuda_package, eager, runner):
    """On a GPU: the C++ runner serves the CUDA package's greedy tokens."""
    folder = cuda_package
    proc = subprocess.run([str(runner), "--model", str(folder / "model_kv.pt2"), "--ids", "7454,2402",
                           "--max-new-tokens", "50", "--device", "cuda"], capture_output=True, text=True)
    want = generate(eager, [[7454, 2402]], max_new_tokens=50, sampling=GREEDY).tokens[0]
    assert proc.returncode == 0 and [int(t) for t in proc.stdout.split(",")] == want
