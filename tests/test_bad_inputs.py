"""The bad input table: every row is one real `python train.py/export.py/generate.py` run.

Each bad row must exit with code 2, print exactly one line on stderr naming the problem,
no traceback, and leave the good run / export / data folders (built once through the same
CLIs) byte for byte and mtime for mtime as they were. Some rows overlap single checks in
test_training / test_export / test_generate_cli; this table is the one place listing them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slm_export import checkpoint
from slm_export.data import Source

ROOT = Path(__file__).resolve().parents[1]
STORIES = 200
MODEL = ["--preset", "tiny", "--block-size", "32", "--n-layer", "1", "--n-head", "2",
         "--n-embd", "16"]
TRAIN = [*MODEL, "--stories", str(STORIES), "--batch-size", "2", "--eval-iters", "1",
         "--eval-interval", "2", "--device", "cpu", "--no-plots", "--quiet"]
pytestmark = pytest.mark.slow


def env(tmp: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp / "hf"), "PYTHONPATH": str(ROOT)}


def cli(tool: str, args: list[str], tmp: Path, timeout: float = 180, **extra_env: str):
    return subprocess.run([sys.executable, str(ROOT / f"{tool}.py"), *args], cwd=tmp,
                          env={**env(tmp), **extra_env}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """A tiny run (2 steps), its export and its data folder, all made through the CLIs. The
    export runs as on a machine without a C++ compiler: ``all`` then skips the AOTInductor
    package with one line (and this file needs only ONNX and TorchScript)."""
    tmp = tmp_path_factory.mktemp("good")
    run = tmp / "run"
    r = cli("train", [*TRAIN, "--max-iters", "2", "--data-root", str(tmp / "data"),
                      "--out-dir", str(run)], tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("export", ["--checkpoint", str(run / "best.pt")], tmp, CXX="/nonexistent/c++")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("skipping aoti (model_kv.pt2): no working C++ compiler"), r.stdout
    return {"tmp": tmp, "run": run, "export": run / "export",
            "data": tmp / "data" / Source.of(stories=STORIES).name}


def snapshot(*folders: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


# -- bad files, made from copies of the good ones -------------------------------------------

def _copy_export(good, tmp: Path, name: str, content: bytes, fix_manifest: bool) -> Path:
    folder = tmp / "export"
    shutil.copytree(good["export"], folder)
    if fix_manifest:  # a consistent manifest, so the file reaches its loader
        (folder / name).write_bytes(content)
        m = json.loads((folder / "manifest.json").read_text())
        m["files"][name].update(sha256=hashlib.sha256(content).hexdigest(), bytes=len(content))
        (folder / "manifest.json").write_text(json.dumps(m))
    else:  # one flipped byte: the manifest's SHA-256 no longer matches
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / name).write_bytes(bytes(data))
    return folder


def _other_config_ckpt(good, tmp: Path) -> Path:
    ckpt = checkpoint.load(good["run"] / "best.pt")
    ckpt["model_config"] = {**ckpt["model_config"], "n_embd": 32}  # lies about its shape
    path = tmp / "other.pt"
    torch.save(ckpt, path)
    return path


def _truncated(good, tmp: Path) -> Path:
    path = tmp / "truncated.pt"
    path.write_bytes((good["run"] / "best.pt").read_bytes()[:5000])
    return path


def _data_copy(good, tmp: Path, damage) -> Path:
    folder = tmp / "prepared"
    shutil.copytree(good["data"], folder)
    damage(folder)
    return folder


def _wrong_dtype_bin(folder: Path) -> None:
    ids = torch.from_numpy(__import__("numpy").fromfile(folder / "train.bin", dtype="uint16"))
    (folder / "train.bin").write_bytes(ids.to(torch.int32).numpy().tobytes())  # int32 ids


def _truncated_bin(folder: Path) -> None:
    data = (folder / "val.bin").read_bytes()
    (folder / "val.bin").write_bytes(data[: len(data) // 2])


def _meta_disagrees(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta["splits"]["train"]["tokens"] += 7
    (folder / "meta.json").write_text(json.dumps(meta))


def _same_size_other_bytes(folder: Path) -> None:
    data = bytearray((folder / "train.bin").read_bytes())
    data[100:104] = b"\xff\xff\xff\xff"  # ids 65535: beyond the vocabulary
    (folder / "train.bin").write_bytes(bytes(data))


def _write(tmp: Path, name: str, content: bytes) -> Path:
    (tmp / name).write_bytes(content)
    return tmp / name


# Each row: (tool, make argv from (good, tmp), expected exit code, text stderr must contain).
ROWS = {
    # train.py
    "train: dataset file missing": ("train", lambda g, t: ["--dataset", str(t / "nope.txt")],
                                    2, "not found"),
    "train: dataset file empty": ("train", lambda g, t: ["--dataset", str(_write(t, "e.txt", b""))],
                                  2, "empty file"),
    "train: init from truncated ckpt": ("train", lambda g, t: ["--init-from", str(_truncated(g, t))],
                                        2, "truncated or corrupt"),
    "train: init from empty ckpt": ("train", lambda g, t: ["--init-from",
                                                           str(_write(t, "e.pt", b""))],
                                    2, "checkpoint is empty"),
    "train: resume with another model config": (
        "train", lambda g, t: ["--resume", "--out-dir", str(g["run"]), "--n-embd", "32"],
        2, "model with config"),
    "train: resume without a checkpoint": ("train", lambda g, t: ["--resume"], 2, "no checkpoint"),
    "train: data .bin of the wrong dtype": (
        "train", lambda g, t: ["--dataset", str(_data_copy(g, t, _wrong_dtype_bin))],
        2, "disagrees with meta.json"),
    "train: data .bin truncated": (
        "train", lambda g, t: ["--dataset", str(_data_copy(g, t, _truncated_bin))],
        2, "disagrees with meta.json"),
    "train: meta.json disagrees with .bin size": (
        "train", lambda g, t: ["--dataset", str(_data_copy(g, t, _meta_disagrees))],
        2, "disagrees with meta.json"),
    "train: .bin bytes differ from meta.json's SHA-256": (
        "train", lambda g, t: ["--dataset", str(_data_copy(g, t, _same_size_other_bytes))],
        2, "SHA-256"),
    "train: dataset with no text in its split": (
        "train", lambda g, t: ["--dataset", str(_write(t, "blank.jsonl",
                                                       b'{"text": ""}\n{"text": "  "}\n'))],
        2, "holds no text"),
    "train: dataset without a text field": (
        "train", lambda g, t: ["--dataset", str(_write(t, "body.jsonl",
                                                       b'{"body": "a"}\n{"body": "b"}\n'))],
        2, "no 'text' field"),
    "train: --batch-size 0": ("train", lambda g, t: ["--batch-size", "0"], 2, "--batch-size"),
    "train: negative --lr": ("train", lambda g, t: ["--lr", "-1e-3"], 2, "--lr"),
    "train: --max-iters -1": ("train", lambda g, t: ["--max-iters", "-1"], 2, "--max-iters"),
    "train: --device cuda without CUDA": ("train", lambda g, t: ["--device", "cuda"], 2, "CUDA"),
    "train: --device of no known kind": ("train", lambda g, t: ["--device", "gpu0"], 2,
                                         "auto, cpu, cuda or cuda:N"),
    # export.py
    "export: checkpoint missing": ("export", lambda g, t: ["--checkpoint", str(t / "nope.pt")],
                                   2, "checkpoint not found"),
    "export: checkpoint empty": ("export", lambda g, t: ["--checkpoint",
                                                         str(_write(t, "e.pt", b""))],
                                 2, "checkpoint is empty"),
    "export: checkpoint truncated": ("export", lambda g, t: ["--checkpoint", str(_truncated(g, t))],
                                     2, "truncated or corrupt"),
    "export: checkpoint of another config": (
        "export", lambda g, t: ["--checkpoint", str(_other_config_ckpt(g, t))],
        2, "do not match its model config"),
    # generate.py
    "generate: model missing": ("generate", lambda g, t: ["--model", str(t / "nope.pt")],
                                2, "model not found"),
    "generate: model file empty": ("generate", lambda g, t: ["--model", str(_write(t, "e.pt", b""))],
                                   2, "checkpoint is empty"),
    "generate: model truncated": ("generate", lambda g, t: ["--model", str(_truncated(g, t))],
                                  2, "truncated or corrupt"),
    "generate: checkpoint of another config": (
        "generate", lambda g, t: ["--model", str(_other_config_ckpt(g, t))],
        2, "do not match its model config"),
    "generate: ONNX file is junk (manifest fixed up)": (
        "generate", lambda g, t: ["--backend", "ort", "--model",
                                  str(_copy_export(g, t, "onnx/model.onnx", b"not onnx" * 99, True))],
        2, "cannot load ONNX file"),
    "generate: ONNX file tampered": (
        "generate", lambda g, t: ["--backend", "ort", "--model",
                                  str(_copy_export(g, t, "onnx/model.onnx", b"", False))],
        2, "SHA-256 mismatch"),
    "generate: TorchScript file corrupt (manifest fixed up)": (
        "generate", lambda g, t: ["--backend", "torchscript", "--model",
                                  str(_copy_export(g, t, "model_kv.ts", b"PK\x03\x04junk" * 50,
                                                   True))],
        2, "cannot load TorchScript file"),
    "generate: TorchScript file tampered": (
        "generate", lambda g, t: ["--backend", "torchscript", "--model",
                                  str(_copy_export(g, t, "model_kv.ts", b"", False))],
        2, "SHA-256 mismatch"),
    "generate: empty prompt": ("generate", lambda g, t: ["--prompt", ""], 2, "prompt is empty"),
    "generate: prompt file not UTF-8": (
        "generate", lambda g, t: ["--prompt-file", str(_write(t, "p.txt", b"il \xe9tait\n"))],
        2, "not valid UTF-8"),
    "generate: unknown backend": ("generate", lambda g, t: ["--backend", "tensorrt"],
                                  2, "invalid choice"),
    "generate: --device cuda without CUDA": ("generate", lambda g, t: ["--device", "cuda"],
                                             2, "CUDA"),
    "generate: --draft-variant for a torch draft": (
        "generate", lambda g, t: ["--speculative", "draft", "--draft-model", str(g["run"]),
                                  "--draft-variant", "int4"],
        2, "--draft-variant int4 needs an ort draft"),
    "generate: --draft-variant the draft's export lacks": (
        "generate", lambda g, t: ["--speculative", "draft", "--draft-model", str(g["export"]),
                                  "--draft-backend", "ort", "--draft-variant", "int4"],
        2, "has no onnx_kv file in int4"),
    # not an error: a prompt longer than the context is cropped to its last block_size tokens
    "generate: prompt longer than the context (ort)": (
        "generate", lambda g, t: ["--backend", "ort", "--model", str(g["export"]),
                                  "--prompt", "Once upon a time " * 40], 0, ""),
}


def _defaults(tool: str, argv: list[str], good, tmp: Path) -> list[str]:
    """Fill in what a row does not set: a fresh run folder, the good model, short outputs."""
    if tool == "train":
        out = [] if "--out-dir" in argv else ["--out-dir", str(tmp / "newrun")]
        data = [] if "--dataset" in argv else ["--data-root", str(good["data"].parent)]
        return [*TRAIN, "--max-iters", "1", *data, *out, *argv]
    if tool == "generate":
        model = [] if "--model" in argv else ["--model", str(good["run"] / "best.pt")]
        return [*model, "--max-new-tokens", "3", "--seed", "0", "--no-stream", *argv]
    return [*argv, "--out-dir", str(tmp / "newexport")]


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_row(row, good, tmp_path):
    tool, make, code, needle = ROWS[row]
    if "without CUDA" in row and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = snapshot(good["run"], good["data"])
    argv = _defaults(tool, make(good, tmp_path), good, tmp_path)
    r = cli(tool, argv, tmp_path)
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    if code == 2:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], r.stderr
        assert not (tmp_path / "newrun" / "ckpt.pt").exists()
        assert not (tmp_path / "newexport").exists()
    else:
        assert r.stdout.strip() and len(r.stdout) > 200
    assert snapshot(good["run"], good["data"]) == before, "a good file changed"


@pytest.mark.parametrize("module, argv, needle", [
    ("slm_export.serve.cli", ["--model", "m", "--port", "70000"], "--port: must be 0..65535, got 70000"),
    ("slm_export.serve.cli", ["--model", "m", "--max-batch", "x"], "invalid positive_int value: 'x'"),
    ("slm_export.cli.generate", ["--top-p", "0"], "--top-p: must be in (0, 1], got 0"),
    ("slm_export.cli.generate", ["--presence-penalty", "3"], "must be in [-2, 2], got 3"),
    ("slm_export.cli.generate", ["--seed", "-1"], "--seed: must be in [0, 2**63), got -1"),
    ("slm_export.cli.export", ["--min-top1", "1.5"], "must be in [0, 1], got 1.5"),
])
def test_a_number_out_of_its_range_is_one_line_naming_the_flag(module, argv, needle, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and needle in err, err
