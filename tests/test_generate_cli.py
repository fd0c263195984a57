"""`python generate.py` end to end: streaming output, batches from a file, seeds, and every
user error as one line on stderr with exit code 2."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slm_export import checkpoint
from slm_export.cli.generate import main
from slm_export.config import PRESETS
from slm_export.model import GPT
from slm_export.runtime import GREEDY, backend_for_model, generate
from slm_export.tokenizer import EOT_ID, decode, encode

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Hi"
SCRIPT_TEXT = " a unicorn 🦄 and 你好!"  # the emoji and each CJK character span 2-3 tokens


def scripted_model(script: list[int]) -> GPT:
    """A GPT whose greedy choice after position p is script[p], whatever the input: the blocks
    add nothing (x = wte[tok] + wpe[pos]) and each position embedding points at its target."""
    torch.manual_seed(0)
    model = GPT(PRESETS["tiny"]).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.zero_()
                lin.bias.zero_()
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        for t in set(script):
            wte[t] *= 5
        for pos, t in enumerate(script):
            wpe[pos] = 20 * wte[t]
    return model


@pytest.fixture(scope="session")
def scripted_ckpt(tmp_path_factory) -> str:
    prompt = encode(PROMPT)
    model = scripted_model([0] * (len(prompt) - 1) + encode(SCRIPT_TEXT) + [EOT_ID])
    out = generate(backend_for_model("eager", model), [prompt], max_new_tokens=40,
                   sampling=GREEDY)
    assert decode(out.tokens[0]) == SCRIPT_TEXT and out.finish == ["eot"]
    path = tmp_path_factory.mktemp("scripted") / "best.pt"
    checkpoint.save(checkpoint.weights_payload(model, model.config), path)
    return str(path)


class Recorder(io.StringIO):
    """A stdout that remembers every write."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def run_main(monkeypatch, argv: list[str]) -> Recorder:
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(argv) == 0
    return out


def test_streaming_prints_token_by_token_and_whole_characters(monkeypatch, scripted_ckpt):
    out = run_main(monkeypatch, ["--model", scripted_ckpt, "--prompt", PROMPT, "--greedy",
                                 "--stream", "--max-new-tokens", "40"])
    assert out.getvalue() == PROMPT + SCRIPT_TEXT + "\n"
    pieces = [w for w in out.writes if w]
    assert len(pieces) > 5  # arrives piece by piece, not in one write
    assert "🦄" in pieces and "你" in pieces  # each character printed whole, once complete
    assert all("\ufffd" not in w for w in out.writes)
    batch = run_main(monkeypatch, ["--model", scripted_ckpt, "--prompt", PROMPT, "--greedy",
                                   "--no-stream", "--max-new-tokens", "40"])
    assert batch.getvalue() == out.getvalue() and len(batch.writes) == 1


def test_streaming_several_prompts_gives_the_batch_text(monkeypatch, tmp_path, tiny_ckpt):
    """--stream prints rows one after another, yet samples them as the one batch --no-stream
    runs: the same seed gives the same text."""
    path = tmp_path / "prompts.txt"
    path.write_text("Once upon a time\nThe dog\n", encoding="utf-8")
    argv = ["--model", tiny_ckpt, "--prompt-file", str(path), "--num-samples", "2", "--seed", "5",
            "--temperature", "1.0", "--top-k", "50", "--max-new-tokens", "20"]
    streamed = run_main(monkeypatch, [*argv, "--stream"])
    batched = run_main(monkeypatch, [*argv, "--no-stream"])
    assert streamed.getvalue() == batched.getvalue()
    assert streamed.getvalue().count("---------------") == 3
    assert len(streamed.writes) > 20 and len(batched.writes) == 1


def test_speculative_flags_keep_the_greedy_text(monkeypatch, tmp_path, trained_ckpt, tiny_ckpt,
                                                trained_export, trained_data):
    path = tmp_path / "prompts.txt"
    path.write_text("Once upon a time\nThe little dog was sad because\n", encoding="utf-8")
    argv = ["--model", trained_ckpt, "--prompt-file", str(path), "--greedy", "--no-stream",
            "--max-new-tokens", "150"]
    plain = run_main(monkeypatch, argv).getvalue()
    for extra in (["--speculative", "ngram"], ["--speculative", "ngram", "--draft-tokens", "6"],
                  ["--speculative", "ngram", "--ngram-data", str(trained_data)],
                  ["--speculative", "draft", "--draft-model", tiny_ckpt, "--draft-backend", "naive"],
                  ["--speculative", "draft", "--draft-model", str(trained_export),
                   "--draft-backend", "ort", "--draft-variant", "int4", "--draft-tokens", "6"],
                  ["--speculative", "draft", "--draft-model", str(trained_export),
                   "--draft-backend", "ort", "--draft-vocab", str(trained_data),
                   "--draft-vocab-size", "300"]):
        assert run_main(monkeypatch, [*argv, *extra]).getvalue() == plain, extra
    proc = _cli(["--model", tiny_ckpt, "--speculative", "draft", "--max-new-tokens", "2"])
    assert proc.returncode == 2 and "needs --draft-model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # Flags that disagree are reported before any model is read (this one does not exist).
    proc = _cli(["--model", str(tmp_path / "missing.pt"), "--ngram-data", str(trained_data)])
    assert proc.returncode == 2 and "needs --speculative ngram" in proc.stderr, proc.stderr
    for extra, says in (
            (["--speculative", "ngram", "--draft-vocab", str(trained_data)], "needs --speculative draft"),
            (["--ngram-data", str(trained_data)], "needs --speculative ngram"),
            (["--speculative", "ngram", "--ngram-data", str(tmp_path)], "no meta.json"),
            (["--speculative", "draft", "--draft-model", tiny_ckpt, "--draft-backend", "eager",
              "--draft-vocab", str(trained_data)], "needs an ort draft"),
            (["--speculative", "draft", "--draft-model", str(trained_export), "--draft-backend",
              "ort", "--draft-vocab", str(tmp_path)], "no meta.json")):
        proc = _cli(["--model", tiny_ckpt, "--max-new-tokens", "2", *extra])
        assert proc.returncode == 2 and says in proc.stderr, (extra, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1


def test_prompt_file_runs_as_one_batch(monkeypatch, tmp_path, tiny_model, tiny_ckpt):
    prompts = ["Once upon a time", "The little dog ran to the big park"]
    path = tmp_path / "prompts.txt"
    path.write_text(f"{prompts[0]}\n\n   \n{prompts[1]}\n", encoding="utf-8")
    out = run_main(monkeypatch, ["--model", tiny_ckpt, "--prompt-file", str(path), "--greedy",
                                 "--no-stream", "--max-new-tokens", "12"])
    want = generate(backend_for_model("eager", tiny_model), [encode(p) for p in prompts],
                    max_new_tokens=12, sampling=GREEDY)
    texts = [p + decode(t) for p, t in zip(prompts, want.tokens, strict=True)]
    assert out.getvalue() == "\n---------------\n".join(texts) + "\n"


def test_seed_decides_the_sample(monkeypatch, tiny_ckpt):
    def text(seed):
        argv = ["--model", tiny_ckpt, "--seed", str(seed), "--temperature", "1.0",
                "--top-k", "100", "--top-p", "0.95", "--max-new-tokens", "16", "--no-stream"]
        return run_main(monkeypatch, argv).getvalue()

    assert text(3) == text(3)
    assert text(3) != text(4)


def test_num_samples(monkeypatch, tiny_ckpt):
    out = run_main(monkeypatch, ["--model", tiny_ckpt, "--num-samples", "3", "--seed", "1",
                                 "--max-new-tokens", "5", "--no-stream", "--backend", "naive"])
    assert out.getvalue().count("Once upon a time") == 3


def _cli(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bad")
    (folder / "corrupt.pt").write_bytes(b"this is not a checkpoint" * 10)
    (folder / "latin1.txt").write_bytes(b"Once upon a time\nil \xe9tait une fois\n")
    return {"corrupt": str(folder / "corrupt.pt"), "latin1": str(folder / "latin1.txt")}


ERRORS = {
    "unknown backend": (["--backend", "tensorrt"], "invalid choice"),
    "missing model": (["--model", "/nonexistent/best.pt"], "model not found"),
    "corrupt model": (["--model", "{corrupt}"], "corrupt"),
    "empty prompt": (["--prompt", ""], "prompt is empty"),
    "whitespace prompt": (["--prompt", "  \t "], "only whitespace"),
    "invalid utf-8 file": (["--prompt-file", "{latin1}"], "not valid UTF-8"),
    "top-k 0": (["--top-k", "0"], "--top-k"),
    "negative temperature": (["--temperature", "-0.5"], "--temperature"),
    "top-p out of range": (["--top-p", "1.5"], "--top-p"),
    "export backend on a checkpoint": (["--backend", "ort"], "needs an export folder"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_are_one_line_exit_2(case, tiny_ckpt, bad_files):
    args, expected = ERRORS[case]
    args = [a.format(**bad_files) for a in args]
    if "--model" not in args:
        args = ["--model", tiny_ckpt, *args]
    proc = _cli([*args, "--max-new-tokens", "2"])
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""


def test_default_model_missing_is_one_line(tmp_path):
    proc = _cli(["--max-new-tokens", "2"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "artifacts/runs/latest" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(tiny_ckpt):
    proc = _cli(["--model", tiny_ckpt, "--device", "cuda", "--max-new-tokens", "2"])
    assert proc.returncode == 2 and "CUDA" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp32", "int8", "fp16"])
def test_ort_variants_through_the_cli(variant, scripted_ckpt, tmp_path_factory, capsys):
    from slm_export.cli.export import main as export_main

    folder = Path(scripted_ckpt).parent / "export"
    if not (folder / "manifest.json").exists():
        assert export_main(["--checkpoint", scripted_ckpt, "--out-dir", str(folder), "--format",
                            "onnx", "--quantize", "int8", "--dtype", "fp16", "--no-verify"]) == 0
    capsys.readouterr()
    assert main(["--backend", "ort", "--variant", variant, "--model", str(folder),
                 "--prompt", PROMPT, "--greedy", "--no-stream", "--max-new-tokens", "40",
                 "--overflow", "slide"]) == 0
    assert capsys.readouterr().out.strip() == (PROMPT + SCRIPT_TEXT).strip()


@pytest.mark.parametrize("overflow", ["rebase", "slide"])
def test_overflow_through_the_cli_on_every_backend(overflow, trained_ckpt, trained_export, capsys):
    """Held-out stories cut at 120 tokens (the first whose continuation does not end within
    30 tokens) and 30 new tokens: every backend crosses the 128-token window under the
    policy and prints eager's text."""
    from slm_export.export.aoti import compiler_problem
    from slm_export.stories import story

    eager = backend_for_model("eager", checkpoint.load_model(trained_ckpt)[0])
    for index in range(2_000_000, 2_000_040):
        prompt = decode(encode(story(index) + " " + story(index + 1))[:120])
        want = generate(eager, [encode(prompt)], max_new_tokens=30, sampling=GREEDY,
                        overflow=overflow)
        if len(want.tokens[0]) == 30:
            break
    assert len(want.tokens[0]) == 30 and want.stats.prefills > 1  # it crosses the window
    argv = ["--prompt", prompt, "--greedy", "--no-stream", "--max-new-tokens", "30",
            "--overflow", overflow, "--device", "cpu"]
    served = ["torchscript", "ort", *([] if compiler_problem() else ["aoti"])]
    texts = {}
    for backend in ["eager", "naive", "compiled", *served]:
        model = trained_export if backend in served else trained_ckpt
        assert main(["--backend", backend, "--model", str(model), *argv]) == 0
        texts[backend] = capsys.readouterr().out
    assert texts["eager"].strip() == (prompt + decode(want.tokens[0])).strip()
    assert {b: t for b, t in texts.items() if t != texts["eager"]} == {}
