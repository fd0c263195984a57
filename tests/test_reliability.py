"""Reliability across modules: bounded memory, fuzzed inputs."""

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slm_export import tokenizer

HELPERS = Path(__file__).parent / "helpers"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_data_preparation_memory_is_bounded(tmp_path):
    """Peak RSS (the kernel's high-water mark) stays flat while the corpus grows 25x, through
    the parallel tokenizer TinyStories uses (>= 50,000 documents), because tokens stream from
    Arrow batches into the .bin file. The bound is far below what holding the big corpus'
    tokens in a Python list would cost."""
    def run(n):
        out = subprocess.run([sys.executable, str(HELPERS / "peak_rss_prepare.py"), str(n)],
                             capture_output=True, text=True, check=True, cwd=tmp_path,
                             env={"HF_DATASETS_CACHE": str(tmp_path / f"hf{n}"), "PATH": "/usr/bin:/bin",
                                  "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                  "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                                  "PYTHONPATH": str(HELPERS.parents[1])})  # this checkout's code
        return map(int, out.stdout.split())

    small_tokens, small_docs, small_peak, small_workers = run(2_000)
    big_tokens, big_docs, big_peak, big_workers = run(51_000)
    assert small_workers == 0 and small_docs < 50_000  # tokenized in this process
    assert big_docs >= 50_000 and big_workers > 0  # tokenized by worker processes
    assert big_tokens > 20 * small_tokens
    as_python_list_mb = big_tokens * (8 + 28) / 2**20  # a pointer and an int object per token
    bound_mb = 100
    assert bound_mb < as_python_list_mb / 2, as_python_list_mb  # ~6M tokens: ~210 MB
    assert big_peak - small_peak < bound_mb, (small_peak, big_peak)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_tokenizer_round_trips_any_text(text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.EOT_ID for i in ids)
    assert tokenizer.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_tokenizer_handles_any_bytes(raw):
    text = raw.decode("utf-8", errors="replace")
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # arbitrary token ids decode without raising (invalid UTF-8 becomes U+FFFD)
    pairs = [raw[i] * 256 + raw[i + 1] for i in range(0, len(raw) - 1, 2)]
    tokenizer.decode([t for t in pairs if t < tokenizer.get_encoding().n_vocab])


def test_os_errors_are_one_line_exit_2(capsys):
    from slm_export.cli.common import entry_point

    @entry_point
    def full_disk(argv):
        raise OSError(28, "No space left on device", "artifacts/runs/x/plots/loss.png")

    assert full_disk([]) == 2
    assert capsys.readouterr().err == (
        "error: artifacts/runs/x/plots/loss.png: No space left on device\n")


def test_closed_stdout_pipe_is_not_an_error(tiny_ckpt):
    # `generate.py | head -c 20`: the reader leaves early; no traceback, exit 0
    proc = subprocess.run(
        f"{sys.executable} generate.py --model {tiny_ckpt} --greedy "
        "--max-new-tokens 100 --num-samples 20 --stream | head -c 20",
        shell=True, capture_output=True, text=True, cwd=Path(__file__).parent.parent,
        timeout=300)
    assert "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr, proc.stderr
    assert len(proc.stdout) == 20
