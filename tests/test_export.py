"""export.py end to end, through the CLI users run, on the tiny preset."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from slm_export.artifacts import kv_layout
from slm_export.artifacts.loaders import quiet_jit
from slm_export.artifacts.manifest import Manifest
from slm_export.cli.export import main
from slm_export.errors import SlmError
from slm_export.export import DEFAULT_GATES, verify
from slm_export.export.aoti import compiler_problem
from slm_export.export.signatures import LogitsModule
from slm_export.model import positions_from_mask
from slm_export.registry import REDUCED as VARIANTS
from slm_export.runtime import backend_for_model
from slm_export.runtime.eager import EagerBackend

ROOT = Path(__file__).resolve().parents[1]
AOTI = compiler_problem() is None  # `all` includes model_kv.pt2 where it can be compiled
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def export_dir(trained_export) -> Path:
    """The session's default export (export.py's defaults: onnx + torchscript, + aoti where a
    C++ compiler is found; full verification) of the trained tiny model, with the int8, int4
    and fp16 variants (tests/conftest.py)."""
    return trained_export


def jit_load(path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        extra = {"config.json": ""}
        return torch.jit.load(str(path), _extra_files=extra), json.loads(extra["config.json"])


def cpu_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def eager_kv(model, ids, past, mask):
    with torch.no_grad():
        return model.forward_kv(ids, past, mask)


def test_default_export_writes_verified_files(export_dir, trained_ckpt, trained_model):
    from slm_export.runtime import executorch

    names = {"model.onnx", "onnx", "model.ts", "model_kv.ts", "manifest.json",
             *(f"model.{v}.onnx" for v in VARIANTS), *(["model_kv.pt2"] if AOTI else []),
             *(["model_kv.pte", "model_kv.int8.pte"] if executorch.problem() is None else [])}
    assert {p.name for p in export_dir.iterdir()} == names
    companions = {"config.json", "generation_config.json", "genai_config.json", "vocab.json",
                  "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert {p.name for p in (export_dir / "onnx").iterdir()} == {
        "model.onnx", *(f"model.{v}.onnx" for v in VARIANTS), *companions}
    assert not [p for p in export_dir.parent.iterdir() if p.name.startswith(".export")]
    m = Manifest.read(export_dir)
    assert m.config == trained_model.config
    assert (m.data["tokenizer"], m.data["source_checkpoint"]) == ("gpt2", trained_ckpt)
    assert m.data["step"] == torch.load(trained_ckpt, weights_only=True)["step"] > 0
    assert m.data["opset"] == 18
    assert set(m.data["versions"]) == {"torch", "onnx", "onnxruntime", "slm_export"}
    assert m.file("onnx_kv") == export_dir / "onnx" / "model.onnx"
    assert m.file("torchscript_kv") == export_dir / "model_kv.ts"
    assert {n for n, e in m.files.items() if e["kind"] == "onnx_config"} == {
        f"onnx/{n}" for n in companions}
    with pytest.raises(SlmError, match="no onnx file in bf16"):
        m.file("onnx", "bf16")
    served = sorted(["ort", "torchscript", *(["aoti"] if AOTI else []),
                     *(["executorch"] if executorch.problem() is None else [])])
    assert m.data["verified"] and m.data["verification"]["generation"]["backends"] == served
    # The tied embedding / lm_head matrix is stored once; TorchScript keeps it in vocabulary
    # blocks (model.blocked_head: the faster lm_head).
    big = [i for i in onnx.load(str(export_dir / "model.onnx")).graph.initializer
           if 50257 in i.dims]
    assert len(big) == 1
    with quiet_jit():
        traced = torch.jit.load(str(export_dir / "model_kv.ts"))
    tied = [p for p in traced.parameters() if p.dim() == 3]
    assert len(tied) == 1 and tied[0].shape == (32, trained_model.config.n_embd, 1571)


def test_full_sequence_files_alone_on_every_length(export_dir, trained_model):
    """model.ts and model.onnx opened directly (not through the export's own verification),
    against eager on every length and two batch sizes."""
    module, meta = jit_load(export_dir / "model.ts")  # traced at length 16 only
    sess = cpu_session(export_dir / "model.onnx")
    ids = torch.randint(0, 50257, (2, 128))
    with torch.no_grad():
        full = trained_model.lm_head(trained_model.hidden_states(ids))
        for T in [*range(1, 128, 9), 127, 128]:
            for B in (1, 2):
                logits = module(ids[:B, :T])
                assert logits.shape == (B, T, 50257)
                torch.testing.assert_close(logits, full[:B, :T], atol=1e-4, rtol=0)
                (onnx_logits,) = sess.run(["logits"], {"input_ids": ids[:B, :T].numpy()})
                torch.testing.assert_close(torch.from_numpy(onnx_logits), full[:B, :T],
                                           atol=1e-4, rtol=0)
    assert json.loads(meta["model_config"]) == trained_model.config.to_dict()
    assert meta["kind"] == "torchscript"


@pytest.mark.parametrize("past", [0, 1, 100])
def test_kv_graphs_alone_match_eager(export_dir, trained_model, past):
    """The files on their own, fed by name (ONNX, as other tools feed them) and by position
    (TorchScript), without logits_to_keep (ONNX: every position) and with it."""
    sess = cpu_session(export_dir / "onnx" / "model.onnx")
    ts, meta = jit_load(export_dir / "model_kv.ts")
    assert meta["kind"] == "torchscript_kv"
    B, T = 3, 5
    kv = trained_model.empty_kv(B)
    if past:
        prefix = torch.randint(0, 50257, (B, past))
        kv = eager_kv(trained_model, prefix, kv, torch.ones(B, past, dtype=torch.long))[1]
    ids = torch.randint(0, 50257, (B, T))
    mask = torch.ones(B, past + T, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    pos = positions_from_mask(mask)[:, past:]
    with torch.no_grad():
        want_logits, want_kv = trained_model.forward_kv(ids, kv, mask, logits_to_keep=0)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy(),
             **{name: t.numpy() for name, t in zip(kv_layout.past_names(4), kv, strict=True)}}
    logits, *present = sess.run(None, feeds)
    assert logits.shape == (B, T, 50257) and len(present) == 8
    # The ONNX graph's fused attention fills padded positions differently (attention_op.py):
    # every value is finite, and real positions match eager.
    real = mask.bool().numpy()
    np.testing.assert_allclose(logits[real[:, past:]], want_logits.numpy()[real[:, past:]],
                               atol=1e-4, rtol=0)
    assert np.isfinite(logits).all()
    for got, want in zip(present, want_kv, strict=True):
        assert got.shape == (B, 4, past + T, 32)
        by_position = got.transpose(0, 2, 1, 3)  # (B, P + T, heads, head_dim)
        np.testing.assert_allclose(by_position[real], want.numpy().transpose(0, 2, 1, 3)[real],
                                   atol=1e-4, rtol=0)
        assert np.isfinite(got).all()
    last, *_ = sess.run(None, {**feeds, "logits_to_keep": np.array(2)})
    np.testing.assert_allclose(last, want_logits[:, -2:].numpy(), atol=1e-4, rtol=0)
    with torch.no_grad():
        ts_logits, *ts_kv = ts(ids, mask, pos, kv, torch.tensor(0))
    torch.testing.assert_close(ts_logits, want_logits, atol=1e-4, rtol=0)
    for got, want in zip(ts_kv, want_kv, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_cache_graph_runs_each_layer_attention_as_one_node(export_dir, trained_model):
    """The cache graph's attention is ONNX Runtime's MultiHeadAttention, one node a layer
    (export/attention_op.py), for the fp32 graph and the variants made from it; the
    full-sequence graph stays plain ONNX."""
    n_layer = trained_model.config.n_layer
    for name in ("model.onnx", "model.int8.onnx", "model.int4.onnx", "model.fp16.onnx"):
        ops = [(n.domain, n.op_type) for n in onnx.load(str(export_dir / "onnx" / name)).graph.node]
        assert ops.count(("com.microsoft", "MultiHeadAttention")) == n_layer, name
        assert not {"Softmax", "Concat"} & {op for _, op in ops}, name  # no op-by-op attention
    full = onnx.load(str(export_dir / "model.onnx"))
    assert {n.domain for n in full.graph.node} <= {"", "ai.onnx"}


def test_onnx_io_names_axes_and_metadata(export_dir, trained_model):
    def axes(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in values}

    kv = onnx.load(str(export_dir / "onnx" / "model.onnx"))
    past = {name: ["batch", 4, "past_sequence", 32] for name in kv_layout.past_names(4)}
    assert axes(kv.graph.input) == {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "total_sequence"],
        "position_ids": ["batch", "sequence"],
        **past,
        "logits_to_keep": [],
    }
    present = {name: ["batch", 4, "total_sequence", 32] for name in kv_layout.present_names(4)}
    assert axes(kv.graph.output) == {"logits": ["batch", "kept_sequence", 50257], **present}
    assert "logits_to_keep" in {i.name for i in kv.graph.initializer}  # optional, default 0
    full = onnx.load(str(export_dir / "model.onnx"))
    assert axes(full.graph.input) == {"input_ids": ["batch", "sequence"]}
    assert axes(full.graph.output) == {"logits": ["batch", "sequence", 50257]}
    for proto, kind in ((full, "onnx"), (kv, "onnx_kv")):
        meta = {p.key: p.value for p in proto.metadata_props}
        assert json.loads(meta["model_config"]) == trained_model.config.to_dict()
        step = str(Manifest.read(export_dir, verify_hashes=False).data["step"])
        assert (meta["kind"], meta["tokenizer"], meta["step"]) == (kind, "gpt2", step)
        assert "torch" in json.loads(meta["versions"])


def test_quantize_auto_publishes_the_smallest_candidate_that_passes(trained_ckpt, tmp_path):
    """--quantize auto measures int4, mixed and int8 against the 8-bit gate and keeps the
    smallest that passes (here mixed: int4's rounding misses the 8-bit bar), each candidate's
    measurements in the manifest, the others' files removed."""
    out = tmp_path / "auto"
    assert main(["--checkpoint", trained_ckpt, "--format", "onnx", "--quantize", "auto",
                 "--out-dir", str(out)]) == 0
    m = Manifest.read(out)
    auto = m.data["verification"]["auto"]
    assert set(auto["candidates"]) == {"int4", "mixed", "int8"}
    passed = {v: r for v, r in auto["candidates"].items() if r["passed"]}
    assert auto["chosen"] == min(passed, key=lambda v: passed[v]["bytes"])
    assert {e["dtype"] for e in m.files.values() if e["kind"] == "onnx_kv"} == {"fp32", auto["chosen"]}
    assert all("top1_agreement" in r or "reason" in r for r in auto["candidates"].values())


def test_variant_files_are_smaller_and_recorded_with_their_gates(trained_export):
    """Each variant file: smaller than fp32, its gate and the providers it was measured on in
    the manifest (the gate itself is enforced by the export: tests below break a file)."""
    m = Manifest.read(trained_export)
    for variant in VARIANTS:
        name = f"onnx/model.{variant}.onnx"
        assert m.file("onnx_kv", variant) == trained_export / name
        assert m.files[name]["bytes"] < m.files["onnx/model.onnx"]["bytes"] / 1.5
        r = m.data["verification"][variant]
        assert r["verified"] and r["gate"] == dataclasses.asdict(DEFAULT_GATES[variant])
        assert r["providers"] == ["CPUExecutionProvider"] and r["tokens"] == 4 * 128


def _damage(write, how: str):
    """The int8 writer, then one weight damaged: the largest quantized tensor shuffled (a
    wrong file), or its scale x 1.5 (every argmax kept: only the loss and KL can tell)."""
    def damaged(src, dst):
        write(src, dst)
        model = onnx.load(str(dst))
        inits = {i.name: i for i in model.graph.initializer}
        weight = max((i for i in inits.values() if i.data_type == onnx.TensorProto.INT8),
                     key=lambda i: np.prod(i.dims))
        target = weight if how == "shuffle" else inits[weight.name.removesuffix("_quantized") + "_scale"]
        values = onnx.numpy_helper.to_array(target)
        values = (np.random.default_rng(0).permutation(values.ravel()).reshape(values.shape)
                  if how == "shuffle" else values * 1.5)
        target.CopyFrom(onnx.numpy_helper.from_array(values.astype(values.dtype), target.name))
        onnx.save(model, str(dst))
    return damaged


def test_a_damaged_int8_file_fails_the_export_and_publishes_nothing(trained_ckpt, tmp_path,
                                                                    monkeypatch, capsys):
    """Over an existing export: exit 2 with the gate's one line, and the old files stay
    byte-identical (files are swapped in only when every check passed)."""
    from slm_export.export import onnx as onnx_export

    out = tmp_path / "export"
    assert main(["--checkpoint", trained_ckpt, "--out-dir", str(out), "--format", "torchscript",
                 "--no-verify"]) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    monkeypatch.setitem(onnx_export.CONVERTERS, "int8", _damage(onnx_export.CONVERTERS["int8"], "shuffle"))
    argv = ["--checkpoint", trained_ckpt, "--out-dir", str(out), "--format", "onnx",
            "--quantize", "int8"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"error: int8 variant: top-1 agreement with fp32 \d+\.\d+% < 95%",
                                      err[0]), err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging left behind


def test_a_scaled_int8_weight_fails_the_kl_gate(trained_model, tmp_path, monkeypatch):
    from slm_export.export import build
    from slm_export.export import onnx as onnx_export

    monkeypatch.setitem(onnx_export.CONVERTERS, "int8", _damage(onnx_export.CONVERTERS["int8"], "scale"))
    with pytest.raises(SlmError, match=r"int8 variant: (loss delta|KL divergence) vs|from fp32"):
        build(trained_model, tmp_path / "export", formats=("onnx",), variants=("int8",))
    assert not (tmp_path / "export").exists()


def test_a_variant_check_that_cannot_run_is_an_error_unless_allowed(trained_model, tmp_path,
                                                                   monkeypatch):
    """fp16 is verified on the CPU; where its check cannot run, the export fails unless the
    user opts out, and the manifest records the opt-out and why."""
    from slm_export.export import build

    real = verify.load_backend

    def no_fp16(name, path, device=None, variant="fp32", **kw):
        if variant == "fp16":
            raise RuntimeError("NOT_IMPLEMENTED : Could not find an implementation for Cast")
        return real(name, path, device, variant=variant, **kw)

    monkeypatch.setattr(verify, "load_backend", no_fp16)
    kw = dict(formats=("onnx",), variants=("fp16",))
    with pytest.raises(SlmError, match="fp16 variant: its quality check could not run .*"
                                       "--allow-unverified fp16 publishes it unchecked"):
        build(trained_model, tmp_path / "a", **kw)
    m = build(trained_model, tmp_path / "b", **kw, allow_unverified=["fp16"])
    r = m.data["verification"]["fp16"]
    assert r["verified"] is False and r["allow_unverified"] and "NOT_IMPLEMENTED" in r["reason"]
    assert m.data["verified"] is True  # every other file was checked


def test_no_verify_is_recorded(tiny_ckpt, tmp_path):
    assert main(["--checkpoint", tiny_ckpt, "--out-dir", str(tmp_path / "e"), "--format", "onnx",
                 "--no-verify"]) == 0
    m = Manifest.read(tmp_path / "e")
    assert m.data["verified"] is False and m.data["verification"] is None


def test_an_opset_23_export_quantizes_to_a_loadable_int8_file(tiny_ckpt, tmp_path):
    """At opset 23 the full-sequence graph's attention is the ONNX Attention op, which
    quantize_dynamic's default op list mistakes for ORT's contrib Attention (an invalid
    graph): the int8 variant names the op types it quantizes."""
    out = tmp_path / "e"
    assert main(["--checkpoint", tiny_ckpt, "--out-dir", str(out), "--format", "onnx",
                 "--opset", "23", "--quantize", "int8", "--no-verify"]) == 0
    assert "Attention" in {n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node}
    sess = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input_ids": np.array([[1, 2, 3]], dtype=np.int64)})
    assert logits.shape == (1, 3, 50257) and np.isfinite(logits).all()


def test_tampered_or_truncated_file_is_detected(export_dir, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(SlmError, match=r"model\.onnx: SHA-256 mismatch"):
        Manifest.read(copy)
    Manifest.read(copy, verify_hashes=False)  # existence is still checked, hashes are not
    (copy / "model.ts").write_bytes(b"truncated")
    (copy / "model.onnx").unlink()
    with pytest.raises(SlmError, match=r"model\.onnx is listed in the manifest but missing"):
        Manifest.read(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(SlmError, match="not valid JSON"):
        Manifest.read(copy)


class NegatedAfter(EagerBackend):
    """Eager, except for its steps after ``at`` positions (negated logits)."""

    name = "bad"

    def __init__(self, model, at: int):
        super().__init__(model)
        self.at = at

    def _forward(self, rows, state, every):
        logits, cache = super()._forward(rows, state, every)
        return (-logits if state.length == self.at else logits), cache


def test_verification_names_the_diverging_shape(tiny_model):
    eager = LogitsModule(tiny_model)

    def off_at_64(ids):
        with torch.no_grad():
            out = eager(ids)
        return out + 1e-3 if ids.size(1) == 64 else out

    with pytest.raises(SlmError, match=r"bad\.onnx: input_ids \[1, 64\]: max \|diff\|"):
        verify.compare_logits(tiny_model, {"bad.onnx": off_at_64}, lengths=(1, 64))
    reference = backend_for_model("eager", tiny_model)
    bad = NegatedAfter(tiny_model, at=31)
    with pytest.raises(SlmError, match=r"bad_kv\.onnx: input_ids \[1, 7\] after past_sequence 31"):
        verify.compare_backend(reference, bad, "bad_kv.onnx", batches=(1,), cases=((0, 1), (31, 7)))
    assert verify.compare_backend(reference, bad, "fine", batches=(1,), cases=((1, 7),))
    with pytest.raises(SlmError, match="bad: greedy continuation"):
        verify.compare_generation(reference, {"bad": bad}, [[464, 1310], [7454]], new_tokens=40)


def test_hf_export_loads_in_transformers(tiny_ckpt, tiny_model, tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="transformers not installed (optional: pip install .[hf])")
    out = tmp_path / "hf_export"
    assert main(["--checkpoint", tiny_ckpt, "--format", "hf", "--out-dir", str(out)]) == 0
    m = Manifest.read(out)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(m.file("hf").parent)).eval()
    ids = torch.randint(0, 50257, (2, 128))
    with torch.no_grad():
        want = tiny_model.lm_head(tiny_model.hidden_states(ids))
        torch.testing.assert_close(hf_model(ids).logits, want, atol=1e-4, rtol=0)


def run_cli(*args):
    return subprocess.run([sys.executable, "export.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def assert_one_line_error(stderr: str, needle: str):
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], stderr


def test_cli_missing_checkpoint_and_unknown_format(tmp_path):
    r = run_cli("--checkpoint", str(tmp_path / "nope.pt"))
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "checkpoint not found")
    r = run_cli("--checkpoint", str(tmp_path / "nope.pt"), "--format", "tflite")
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "invalid choice: 'tflite'")


def test_cli_errors_in_process(tmp_path, tiny_ckpt, capsys):
    bad = tmp_path / "best.pt"
    bad.write_bytes(Path(tiny_ckpt).read_bytes()[:1000])
    cases = [
        (["--checkpoint", str(bad)], "truncated or corrupt"),
        (["--checkpoint", tiny_ckpt, "--opset", "7"], "--opset 7 is not supported"),
        (["--checkpoint", tiny_ckpt, "--format", "torchscript", "--quantize", "int8"],
         "applies to ONNX"),
        (["--checkpoint", tiny_ckpt, "--out-dir", str(tmp_path)], "not an export folder"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        assert_one_line_error(capsys.readouterr().err, needle)
    assert not (tmp_path / "export").exists()  # nothing written for the corrupt checkpoint
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}")]
