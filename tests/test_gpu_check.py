"""scripts/gpu-check.sh --dry-run, as CI runs it: on a machine without CUDA every step runs
its CPU part or says "NEEDS CUDA" and why, so the check cannot rot before a GPU runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_the_dry_run_reports_every_step(tmp_path):
    env = {**os.environ, "SLM_GPU_CHECK_ROOT": str(tmp_path / "root")}
    proc = subprocess.run(["bash", "scripts/gpu-check.sh", "--dry-run", "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    assert report["dry_run"] and list(report["steps"]) == list(gpu_check.STEPS)
    for name, step in report["steps"].items():
        assert step["status"] in ("PASS", "NEEDS CUDA"), (name, step)
        if step["status"] == "NEEDS CUDA":
            assert "torch.cuda.is_available() is False" in step["reason"], (name, step)
    assert "collected" in report["steps"]["pytest_cuda"]["reason"]  # the CUDA tests still collect
    assert "facts" in (tmp_path / "out" / "gpu-check.txt").read_text()


def test_a_step_that_left_no_result_fails_the_report(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    (tmp_path / "steps").mkdir()
    for name in gpu_check.STEPS[1:]:
        (tmp_path / "steps" / f"{name}.json").write_text(json.dumps({"status": "NEEDS CUDA", "reason": "x"}))
    assert gpu_check.report(tmp_path, dry=True) == 1  # facts: killed at its limit, no file
    steps = json.loads((tmp_path / "gpu-check.json").read_text())["steps"]
    assert steps["facts"]["status"] == "FAIL" and "limit" in steps["facts"]["reason"]
    assert gpu_check.report(tmp_path, dry=False) == 1  # on a GPU anything but PASS fails
