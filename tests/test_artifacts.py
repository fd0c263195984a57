"""The artifacts layer: the ONNX Runtime session builder's provider diagnosis and placement
report (the code a GPU machine runs, exercised here without one), and folder publishing."""

from __future__ import annotations

import subprocess
import sys

import onnxruntime as ort
import pytest
import torch

from slm_export.artifacts import loaders
from slm_export.artifacts.files import publish_folder, recover_folder, remove_stale_temps, staging_folder
from slm_export.artifacts.loaders import CudaProviderError, cpu_fallback, ort_cuda_problem, ort_session
from slm_export.runtime import load_backend

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_ckpt):
    from slm_export.export import build

    folder = tmp_path_factory.mktemp("artifacts") / "export"
    build(tiny_ckpt, folder, formats=("onnx",), variants=("int8",), verify=False)
    return folder


@pytest.mark.skipif(CUDA, reason="checks the diagnosis on a machine without a usable GPU")
def test_cuda_provider_problem_names_the_missing_library():
    """onnxruntime-gpu lists CUDAExecutionProvider even where it cannot start: the
    diagnosis says why (here: the NVIDIA libraries are not installed)."""
    assert "CUDAExecutionProvider" in ort.get_available_providers()
    problem = ort_cuda_problem()
    assert problem and "does not load" in problem and ".so" in problem
    assert "onnxruntime-gpu[cuda,cudnn]" in problem and "\n" not in problem


def test_cuda_provider_problem_of_a_cpu_build_and_of_mismatched_majors(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert "has no CUDA provider" in ort_cuda_problem()
    monkeypatch.undo()
    monkeypatch.setattr(loaders, "ort_cuda_build", lambda: "13.0")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    problem = ort_cuda_problem()
    assert "built for CUDA 13.0" in problem and "for CUDA 12.8" in problem


def test_placement_and_cpu_fallback(export_dir):
    """The placement report a CUDA session is checked with, on CPU sessions: the int8 graph's
    dynamic quantization is arithmetic that would stay on the CPU under a GPU provider."""
    int8 = ort_session(export_dir / "onnx" / "model.int8.onnx")
    placed = loaders.placement(int8)
    assert set(placed) == {"CPUExecutionProvider"} and placed["CPUExecutionProvider"]["MatMulInteger"] > 0
    fallback = cpu_fallback(int8, "CUDAExecutionProvider")
    assert fallback["MatMulInteger"] > 0 and "DynamicQuantizeLinear" in fallback
    assert "Shape" not in fallback  # shape ops on the CPU are ORT's choice, not a fallback
    assert cpu_fallback(int8, "CPUExecutionProvider") == {}


def test_ort_backend_refuses_a_provider_that_did_not_start(export_dir, monkeypatch):
    backend = load_backend("ort", export_dir, variant="int8")
    with pytest.raises(CudaProviderError, match="did not start CUDAExecutionProvider"):
        backend._check_providers(backend.path, "CUDAExecutionProvider")
    # Had CUDA started, the int8 file's arithmetic would still run on the CPU: refused too.
    monkeypatch.setattr(backend.session, "get_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(CudaProviderError, match="MatMulInteger x.*use --variant fp16 on CUDA"):
        backend._check_providers(backend.path, "CUDAExecutionProvider")


def test_publish_recover_and_stale_staging(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    out = tmp_path / "export"
    old = tmp_path / f".export.old{dead}"  # moved aside by a killed publish; the new never came
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    (tmp_path / f".export.tmp{dead}").mkdir()  # a killed export's staging folder
    recover_folder(out)
    assert (out / "manifest.json").read_text() == "{}" and not old.exists()
    remove_stale_temps(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with staging_folder(out) as staging:
        (staging / "manifest.json").write_text("new")
        publish_folder(staging, out)
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
