"""slm-eval on the session's export and the user's own text (a local file), through the command."""

from __future__ import annotations

import json

import pytest

from slm_export.evaluate import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def own_text(tmp_path_factory):
    """A user's held-out text: a .txt of blank-line separated stories the model never saw."""
    from slm_export.stories import story

    path = tmp_path_factory.mktemp("text") / "mine.txt"
    path.write_text("\n\n".join(story(2_000_000 + i) for i in range(60)))
    return path


def test_every_file_is_scored_against_fp32(trained_export, own_text, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["--model", str(trained_export.parent), "--dataset", str(own_text), "--split", "train",
                 "--rows", "6", "--data-root", str(tmp_path / "data"), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["file"]: r for r in doc["rows"]}
    assert doc["tokens"] == 6 * 128
    for name in ("onnx/model.onnx", "onnx/model.int8.onnx", "onnx/model.int4.onnx",
                 "onnx/model.mixed.onnx", "onnx/model.fp16.onnx", "model_kv.ts"):
        assert rows[name]["error"] is None, rows[name]
    fp32 = rows["onnx/model.onnx"]
    reference = rows["best.pt (fp32 checkpoint)"]
    assert fp32["top1"] == 1.0 and fp32["kl"] < 1e-6
    assert fp32["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)
    assert 1 < reference["perplexity"] < 50 and reference["accuracy"] > 0.3  # a model of this text
    assert rows["onnx/model.int4.onnx"]["kl"] > rows["onnx/model.int8.onnx"]["kl"] > 0
    assert "slm-eval" in capsys.readouterr().out


def test_the_scores_are_what_the_gates_measured(trained_export):
    """The gate and slm-eval score with one function (runtime.parity.scores): the manifest's
    int8 record and a re-scoring of the same held-out text agree."""
    import torch

    from slm_export.artifacts.manifest import Manifest
    from slm_export.export.verify import held_out_tokens
    from slm_export.runtime import load_backend, parity

    m = Manifest.read(trained_export, verify_hashes=False)
    tokens = held_out_tokens(m.config)
    eager, int8 = load_backend("eager", trained_export), load_backend("ort", trained_export, variant="int8")
    got = parity.teacher_forced(eager, int8, tokens)
    record = m.data["verification"]["int8"]
    assert got["top1"] == pytest.approx(record["kv_top1_agreement"])
    assert got["kl"] == pytest.approx(record["kv_kl"], rel=1e-3)
    assert torch.is_tensor(tokens)


def test_bad_input_is_one_line(trained_export, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--dataset", "stories"]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["--model", str(trained_export.parent), "--dataset", str(tmp_path / "missing.txt")]) == 2
    assert "dataset file not found" in capsys.readouterr().err
