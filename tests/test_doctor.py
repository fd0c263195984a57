"""slm-doctor, as a user runs it first on a new machine (here: the CPU half)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_doctor_on_this_machine(tmp_path):
    out = tmp_path / "doctor.json"
    proc = subprocess.run([sys.executable, "-m", "slm_export.doctor", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(out.read_text())
    smokes = {(s["backend"], s["device"]): s["status"] for s in report["smoke"]}
    for name in ("eager", "compiled", "torchscript", "ort", "naive", "aoti"):
        assert smokes[(name, "cpu")] == "PASS", report["smoke"]  # CI has a C++ compiler
        assert name in proc.stdout
    assert report["facts"]["C++ compiler (compiled on the CPU, aoti)"] == "works"
    assert report["facts"]["ORT providers available"]
    if not torch.cuda.is_available():
        assert "CUDA is absent" in proc.stdout and report["facts"]["ORT CUDA provider"] != "can start"
        assert "[cuda,cudnn]" in report["facts"]["ORT CUDA provider"]
        assert "[cuda,cudnn]" in proc.stdout  # printed as text, not eaten as rich markup
        assert not any(device == "cuda" for _, device in smokes)


def test_doctor_reports_a_failing_backend(monkeypatch, tmp_path):
    """A backend that gives other tokens is a FAIL with a reason, and the exit code says so."""
    from slm_export import doctor
    from slm_export.runtime import eager

    real = eager.EagerBackend._forward

    def off_by_one(self, rows, state, every):
        logits, cache = real(self, rows, state, every)
        return logits.roll(1, dims=-1), cache

    def no_export(*args, **kwargs):
        raise AssertionError("naive reads no exported file: the doctor should export nothing")

    monkeypatch.setattr(eager.EagerBackend, "_forward", off_by_one)
    monkeypatch.setattr("slm_export.export.build", no_export)
    out = tmp_path / "doctor.json"
    assert doctor.main(["--backends", "naive", "--json", str(out)]) == 1
    # eager is also the reference, so the reference changes too: compare with another backend
    (naive,) = json.loads(out.read_text())["smoke"]
    assert (naive["backend"], naive["status"]) == ("naive", "FAIL")
    assert "greedy continuation" in naive["detail"]


def test_doctor_refuses_an_unknown_backend(capsys):
    from slm_export import doctor

    with pytest.raises(SystemExit) as exit_:
        doctor.main(["--backends", "eager,tensorrt"])
    assert exit_.value.code == 2 and "choose from eager" in capsys.readouterr().err


@pytest.mark.parametrize("backends,formats", [
    (["ort"], ["onnx"]), (["torchscript", "eager"], ["torchscript"]), (["aoti"], ["aoti"]),
    (["naive", "compiled"], None)])
def test_doctor_exports_only_what_its_backends_read(monkeypatch, tmp_path, backends, formats):
    """``--backends`` builds only the files those backends load (none for the torch ones), and
    no aoti package where no C++ compiler is found."""
    from slm_export import doctor
    from slm_export.export import aoti

    asked = []
    monkeypatch.setattr("slm_export.export.build", lambda model, folder, formats, **kw:
                        asked.append(list(formats)))
    doctor._export_smoke_model(tmp_path, backends)
    assert asked == ([] if formats is None else [formats])
    monkeypatch.setattr(aoti, "compiler_problem", lambda: "no C++ compiler (test)")
    asked.clear()
    doctor._export_smoke_model(tmp_path, backends)
    left = [f for f in formats or [] if f != "aoti"]
    assert asked == ([left] if left else [])


def test_the_doctors_gpu_extras_run_their_logic_on_the_cpu(tmp_path):
    """What the doctor adds on CUDA (speculation per backend, two training steps per
    precision), run here on the CPU so the lines a GPU runs are not new there."""
    from slm_export import doctor

    model = doctor._export_smoke_model(tmp_path, ["ort"])
    rows = doctor.extras(tmp_path, model, ["eager", "ort"], "cpu")
    assert [(r.backend, r.status) for r in rows] == [
        ("eager + ngram", "PASS"), ("ort + ngram", "PASS"), ("train fp32", "PASS")], rows
