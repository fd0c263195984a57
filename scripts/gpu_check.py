"""The GPU check's steps (scripts/gpu-check.sh runs each with its own time limit).

    python scripts/gpu_check.py prepare ROOT       # here, with `datasets`: the data the check needs
    python scripts/gpu_check.py step NAME ROOT OUT [--dry-run]
    python scripts/gpu_check.py report OUT

A step writes OUT/steps/NAME.json: {"status": "PASS" | "FAIL" | "NEEDS CUDA", "reason", ...
its figures}. On a machine without CUDA (``--dry-run``, as CI runs it) every step either runs
its CPU part or says "NEEDS CUDA" and why, so the script cannot rot before a GPU runs it.
The machine the check is meant for has a CUDA torch, nvcc and CMake but no package index,
no ``datasets`` and maybe no onnxruntime-gpu: ``prepare`` writes, on a machine that has them,
the prepared stories and the GPT-2 ranks (a few MB), and the steps say what they could not
run and why. The trained run lands where the tests look for theirs (``$SLM_TEST_RUN``), so
``pytest -m cuda`` reuses it instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS = ("facts", "train", "export", "ort_cuda", "parity", "speed", "cudagraphs", "speculative",
         "pytest_cuda")
LIMITS = {"facts": 60, "train": 150, "export": 240, "ort_cuda": 90, "parity": 150, "speed": 120,
          "cudagraphs": 90, "speculative": 120, "pytest_cuda": 300}  # seconds each
STORIES, STEPS_TRAINED = 2000, 150  # the tests' trained run (tests/conftest.py)
PROMPTS = [[7454, 2402, 257, 640], [464, 1310, 3290], [3198, 1110, 11], [40, 373, 257, 1310, 2576],
           [51, 296, 550, 257, 2266, 2613, 13], [2953], [818, 262, 8222], [43, 813, 290, 4186, 1816]]


def cuda_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA " \
               f"{torch.version.cuda or 'none: a CPU build'})"
    return None


def source_stamp() -> str:
    """What tests/conftest.py keys a kept trained run by: the package's source."""
    package = REPO / "slm_export"
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(package.rglob("*.py")))).hexdigest()


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- the steps ------------------------------------------------------------------------------------

def step_facts(root: Path, dry: bool) -> dict:
    """Driver, CUDA, compute capability, the toolkit AOTInductor needs, ONNX Runtime's providers."""
    import onnxruntime as ort
    import torch

    from slm_export.artifacts.loaders import ort_cuda_problem
    from slm_export.export.aoti import cuda_toolkit_problem

    facts = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
             "ort_cuda": ort_cuda_problem() or "can start",
             "toolkit": cuda_toolkit_problem() or "found" if torch.version.cuda else "a CPU torch"}
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        facts["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return {"status": "PASS", **facts}


def step_train(root: Path, dry: bool) -> dict:
    """The tests' trained run (where pytest -m cuda finds it), then 20 steps in bf16 and in fp16
    with a GradScaler and --grad-accum 2: loss finite and falling, scale, tokens/s, peak memory."""
    import torch

    from slm_export.training import train_brief

    run = root / "run"
    if dry:  # the same code, two steps on the CPU
        best = train_brief("tiny", 2, root / "dry-run", root / "data", stories=STORIES)
        return {"status": "NEEDS CUDA", "reason": f"trained 2 steps on the CPU only ({best}): "
                f"{cuda_reason()}"}
    start = time.perf_counter()
    if not (run / "best.pt").is_file():
        train_brief("tiny", STEPS_TRAINED, run, root / "data", stories=STORIES, device="cuda")
    out = {"status": "PASS", "trained_s": round(time.perf_counter() - start, 1)}
    from slm_export.devices import bf16_support

    for dtype in ("bf16", "fp16"):
        if dtype == "bf16" and bf16_support(torch.device("cuda")) != "native":
            out[dtype] = {"status": "SKIP", "reason": "no native bf16 on this GPU (fp16 trains)"}
            continue
        out[dtype] = _precision_run(root, dtype)
        if out[dtype]["status"] != "PASS":
            out["status"] = "FAIL"
    return out


def _precision_run(root: Path, dtype: str) -> dict:
    import torch

    from slm_export import checkpoint
    from slm_export.config import TrainConfig, preset
    from slm_export.training import train

    torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(dataset="stories", stories=STORIES, max_iters=20, eval_interval=10, eval_iters=2,
                      batch_size=8, grad_accum=2, dtype=dtype, device="cuda", plots=False, lr=2e-3,
                      warmup_iters=2, out_dir=str(root / f"train-{dtype}"), data_root=str(root / "data"))
    result = train(cfg, preset("tiny"))
    losses = [m["train_loss"] for m in result.metrics]
    scaler = checkpoint.load(root / f"train-{dtype}" / "ckpt.pt").get("scaler") or {}
    ok = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    return {"status": "PASS" if ok else "FAIL", "losses": losses, "scale": scaler.get("scale"),
            "tokens_per_s": result.metrics[-1].get("tokens_per_s"),
            "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def step_export(root: Path, dry: bool) -> dict:
    """ONNX (fp32 and every variant), TorchScript, verified on the CPU (the tests reuse it), and
    the AOTInductor package for CUDA (it needs the toolkit)."""
    from slm_export.export import build
    from slm_export.export.aoti import cuda_toolkit_problem
    from slm_export.registry import REDUCED

    if dry:
        model = root / "dry-run" / "best.pt"
        build(model, root / "dry-run" / "export", formats=("onnx",), variants=("int4",), verify=False)
        return {"status": "NEEDS CUDA", "reason": "exported onnx + int4 unverified on the CPU only; "
                f"the CUDA package needs a GPU: {cuda_reason()}"}
    start, out = time.perf_counter(), {"status": "PASS"}
    build(root / "run" / "best.pt", root / "run" / "export", formats=("onnx", "torchscript"),
          variants=REDUCED)
    out["export_s"] = round(time.perf_counter() - start, 1)
    problem = cuda_toolkit_problem()
    if problem:
        out["aoti_cuda"] = {"status": "SKIP", "reason": problem}
    else:
        start = time.perf_counter()
        build(root / "run" / "best.pt", root / "aoti-cuda", formats=("aoti",), device="cuda")
        out["aoti_cuda"] = {"status": "PASS", "seconds": round(time.perf_counter() - start, 1)}
    return out


def _eager(root: Path, on="cuda"):
    from slm_export.runtime import load_backend

    return load_backend("eager", root / "run" / "best.pt", on)


def step_ort_cuda(root: Path, dry: bool) -> dict:
    """ORT on CUDA, fp32 / fp16 / int4: where each op runs, and the max logit difference from
    eager with TF32 off (our default) and on."""
    if dry:
        return {"status": "NEEDS CUDA", "reason": cuda_reason()}
    import torch

    from slm_export.artifacts.loaders import ort_cuda_problem, placement
    from slm_export.runtime import load_backend

    if problem := ort_cuda_problem():
        return {"status": "SKIP", "reason": problem}
    eager, ids, out = _eager(root), torch.tensor([PROMPTS[0] * 8]), {"status": "PASS"}
    want, _ = eager.prefill(ids.cuda(), None)
    for variant in ("fp32", "fp16", "int4"):
        for tf32 in (False, True):
            backend = load_backend("ort", root / "run", "cuda", variant, tf32=tf32)
            have, _ = backend.prefill(ids.cuda(), None)
            out[f"{variant}{' tf32' if tf32 else ''}"] = {
                "max_abs_diff": float((have - want).abs().max()),
                "placement": placement(backend.session)}
    return out


def _backends(root: Path):
    """Every backend that can run on CUDA here: name -> backend (or the reason it cannot)."""
    import copy

    from slm_export.artifacts.loaders import ort_cuda_problem
    from slm_export.checkpoint import load_model
    from slm_export.runtime import backend_for_model, load_backend

    model, _ = load_model(root / "run" / "best.pt")
    made: dict = {}
    for name in ("eager", "compiled", "naive"):
        made[name] = backend_for_model(name, copy.deepcopy(model).cuda())
    made["torchscript"] = load_backend("torchscript", root / "run", "cuda")
    made["ort"] = ort_cuda_problem() or load_backend("ort", root / "run", "cuda")
    made["aoti"] = load_backend("aoti", root / "aoti-cuda", "cuda") if (root / "aoti-cuda").is_dir() \
        else "no CUDA package (see the export step)"
    return made


def step_parity(root: Path, dry: bool) -> dict:
    """Greedy tokens of every CUDA backend against eager on the CPU (ties allowed), at batch 1
    and for a padded batch of 8."""
    if dry:
        return {"status": "NEEDS CUDA", "reason": cuda_reason()}
    from slm_export.runtime import parity

    reference, out = _eager(root, "cpu"), {"status": "PASS"}
    for name, backend in _backends(root).items():
        if isinstance(backend, str):
            out[name] = {"status": "SKIP", "reason": backend}
            continue
        try:
            one = parity.greedy(reference, backend, PROMPTS[:1], 150).check(2e-4)
            eight = parity.greedy(reference, backend, PROMPTS, 150).check(2e-4)
            out[name] = {"status": "PASS", "ties_b1": one.tie_count, "ties_b8": eight.tie_count}
        except Exception as e:  # each backend's failure is its row
            out[name], out["status"] = {"status": "FAIL", "reason": f"{type(e).__name__}: {e}"[:300]}, "FAIL"
    return out


def step_speed(root: Path, dry: bool) -> dict:
    """Decode tokens/s and peak memory per CUDA backend at batch 1 and 8 (median of 3 rounds)."""
    if dry:
        return {"status": "NEEDS CUDA", "reason": cuda_reason()}
    import torch

    from slm_export import benchmark as bm
    from slm_export.runtime import GREEDY, generate

    out = {"status": "PASS"}
    for name, backend in _backends(root).items():
        if isinstance(backend, str):
            out[name] = {"status": "SKIP", "reason": backend}
            continue
        row = {}
        for batch in (1, 8):
            torch.cuda.reset_peak_memory_stats()
            run = {"gen": lambda b=batch, be=backend: generate(be, [PROMPTS[0]] * b, max_new_tokens=124,
                                                              sampling=GREEDY, stop_id=None)}
            timed = bm.interleaved(run, 3, sync=torch.cuda.synchronize)
            row[f"b{batch}_tokens_per_s"] = round(batch * 124 / statistics.median(timed.seconds["gen"]), 1)
            row[f"b{batch}_peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out[name] = row
    return out


def step_cudagraphs(root: Path, dry: bool) -> dict:
    """compiled's decode graph on CUDA: how many CUDA graphs inductor skipped (0 expected)."""
    if dry:
        return {"status": "NEEDS CUDA", "reason": cuda_reason()}
    from torch._dynamo.utils import counters

    from slm_export.runtime import GREEDY, generate

    backend = _backends(root)["compiled"]
    counters.clear()
    generate(backend, PROMPTS, max_new_tokens=60, sampling=GREEDY, stop_id=None)
    skips = counters["inductor"]["cudagraph_skips"]
    return {"status": "PASS" if skips == 0 else "FAIL", "cudagraph_skips": skips}


def step_speculative(root: Path, dry: bool) -> dict:
    """compiled with n-gram drafts from the training text against plain greedy (paired rounds)."""
    if dry:
        return {"status": "NEEDS CUDA", "reason": cuda_reason()}
    import torch

    from slm_export import benchmark as bm
    from slm_export.runtime import GREEDY, generate
    from slm_export.runtime.ngram_table import NgramTable
    from slm_export.runtime.speculative import NgramDrafter

    backend = _backends(root)["compiled"]
    (data,) = (root / "data").glob("stories-*")
    table = NgramTable.from_data(data)
    kw = dict(max_new_tokens=200, sampling=GREEDY, stop_id=None)
    runs = {"speculative": lambda: generate(backend, PROMPTS[:1], drafter=NgramDrafter(table=table), **kw),
            "plain": lambda: generate(backend, PROMPTS[:1], **kw)}
    timed = bm.interleaved(runs, 5, sync=torch.cuda.synchronize)
    same = timed.first["speculative"].tokens == timed.first["plain"].tokens
    return {"status": "PASS" if same else "FAIL", "identical_tokens": same,
            "gain": round(bm.gain(timed.seconds["speculative"], timed.seconds["plain"]), 3)}


def step_pytest_cuda(root: Path, dry: bool) -> dict:
    """pytest -m cuda on the check's trained run; every skip is listed with its reason."""
    env = {**os.environ, "SLM_TEST_RUN": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if dry:  # the tests still collect here
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "--collect-only", "-q",
                               "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=LIMITS["pytest_cuda"] - 10)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0:
            return {"status": "FAIL", "reason": "pytest -m cuda does not collect: " + " ".join(lines[-3:])}
        return {"status": "NEEDS CUDA", "reason": f"{lines[-1] if lines else '?'}; {cuda_reason()}"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-rs", "-q", "-p",
                           "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=LIMITS["pytest_cuda"] - 10)
    lines = proc.stdout.strip().splitlines()
    skips = [line for line in lines if line.startswith("SKIPPED")]
    return {"status": "PASS" if proc.returncode == 0 and not skips else "FAIL",
            "summary": lines[-1] if lines else proc.stderr[-300:], "skipped": skips,
            "failed": [line for line in lines if line.startswith("FAILED")]}


# -- the driver -----------------------------------------------------------------------------------

def prepare(root: Path) -> None:
    """The prepared stories and the GPT-2 ranks, for a machine without `datasets` or a PyPI."""
    from slm_export import tokenizer
    from slm_export.data import Source
    from slm_export.data import prepare as prepare_data

    root.mkdir(parents=True, exist_ok=True)
    prepare_data(Source.of(stories=STORIES), root / "data")
    shutil.copy(tokenizer.bpe_file(), root / "gpt2.tiktoken")
    print(f"prepared {root}: {sum(f.stat().st_size for f in root.rglob('*') if f.is_file()) / 2**20:.1f} MB")


def run_step(name: str, root: Path, out: Path, dry: bool) -> None:
    if (root / "gpt2.tiktoken").is_file():
        os.environ.setdefault("SLM_GPT2_BPE", str(root / "gpt2.tiktoken"))
    (root / "source.sha256").write_text(source_stamp())  # the tests may reuse this run
    start = time.perf_counter()
    try:
        result = globals()[f"step_{name}"](root, dry)
    except Exception as e:  # the step's failure is its result
        result = {"status": "FAIL", "reason": f"{type(e).__name__}: {str(e)[:400]}"}
    result["seconds"] = round(time.perf_counter() - start, 1)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    (out / "steps" / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


def report(out: Path, dry: bool) -> int:
    """gpu-check.json and gpu-check.txt from the steps' files; exit 1 if a step failed (on a
    GPU: anything but PASS)."""
    steps = {}
    for name in STEPS:
        path = out / "steps" / f"{name}.json"
        steps[name] = json.loads(path.read_text()) if path.is_file() else {
            "status": "FAIL", "reason": f"no result: killed at its {LIMITS[name]} s limit, or it crashed"}
    (out / "gpu-check.json").write_text(json.dumps({"dry_run": dry, "steps": steps}, indent=2) + "\n")
    lines = [f"slm-export GPU check{' (dry run: no CUDA here)' if dry else ''}"]
    for name, r in steps.items():
        lines.append(f"{name:12} {r['status']:10} {r.get('seconds', '-')!s:>6} s  {r.get('reason', '')}")
        for key, value in r.items():
            if key not in ("status", "reason", "seconds"):
                lines.append(f"{'':12} {key}: {json.dumps(value, default=str)[:300]}")
    (out / "gpu-check.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    allowed = {"PASS", "NEEDS CUDA"} if dry else {"PASS"}
    return 0 if all(r["status"] in allowed for r in steps.values()) else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["prepare"]:
        prepare(Path(argv[1]))
        return 0
    if argv[:1] == ["step"]:
        run_step(argv[1], Path(argv[2]), Path(argv[3]), "--dry-run" in argv)
        return 0
    if argv[:1] == ["report"]:
        return report(Path(argv[1]), "--dry-run" in argv)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
