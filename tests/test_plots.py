"""Plots: valid PNGs of sane size, and attention weights that reproduce the model's attention."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from slm_export import checkpoint, plots
from slm_export.cli.train import main
from slm_export.config import GPTConfig, TrainConfig
from slm_export.model import GPT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def run_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    payload = checkpoint.weights_payload(model, model.config, step=20, val_loss=6.0)
    payload["train_config"] = TrainConfig(max_iters=40, warmup_iters=5, lr=1e-3, min_lr=1e-4).to_dict()
    checkpoint.save(payload, tmp_path / "best.pt")
    rows = [{"step": s, "train_loss": 10.8 - s / 10, "val_loss": 10.9 - s / 11, "val_ppl": 1.0,
             "val_acc": 0.0, "lr": 1e-3, "tokens_per_s": 1.0} for s in range(0, 41, 10)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    return tmp_path


def test_plots_only_writes_valid_pngs(run_dir, capsys):
    assert main(["--plots-only", str(run_dir)]) == 0
    names = {"loss.png", "lr.png", "weights.png", "attention.png"}
    assert {p.name for p in (run_dir / "plots").iterdir()} == names
    for name in names:
        path = run_dir / "plots" / name
        width, height = png_size(path)
        assert 400 <= width <= 2000 and 300 <= height <= 2000, (name, width, height)
        assert path.stat().st_size > 5_000, name
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


def test_plots_only_without_checkpoint_is_an_error(tmp_path, capsys):
    assert main(["--plots-only", str(tmp_path)]) == 2
    assert "no best.pt or ckpt.pt" in capsys.readouterr().err


def test_attention_weights_reproduce_the_attention_layer():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, dropout=0.0)).eval()
    idx = torch.randint(0, 50257, (1, 10))
    heads = [plots.attention_weights(model, idx, layer=1, head=h) for h in range(4)]
    for att in heads:
        assert att.shape == (10, 10)
        torch.testing.assert_close(att.sum(-1), torch.ones(10))
        assert torch.all(att.triu(1) == 0)  # causal
    # att @ v for every head, then c_proj, must equal the block's own (SDPA) attention output
    with torch.no_grad():
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(10))
        x = model.transformer.h[0](x)
        block = model.transformer.h[1]
        h = block.ln_1(x)
        v = block.attn.c_attn(h).split(32, dim=2)[2].view(10, 4, 8)
        y = torch.cat([heads[i] @ v[:, i] for i in range(4)], dim=-1)
        torch.testing.assert_close(block.attn.c_proj(y)[None], block.attn(h), atol=1e-5, rtol=1e-4)
    with pytest.raises(Exception, match="no layer 5"):
        plots.attention_weights(model, idx, layer=5, head=0)
