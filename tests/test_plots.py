"""Plots: valid PNGs of sane size, and attention weights that reproduce the model's attention."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import matplotlib.axes
import pytest
import torch

from slm_export import checkpoint, plots
from slm_export.cli.train import main
from slm_export.config import PRESETS, GPTConfig, TrainConfig
from slm_export.data import Source, prepare
from slm_export.model import GPT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_RUN = ["--preset", "tiny", "--stories", "300", "--block-size", "32", "--n-layer", "1",
            "--n-head", "2", "--n-embd", "32", "--batch-size", "2", "--eval-iters", "1",
            "--max-iters", "2", "--eval-interval", "1", "--device", "cpu"]


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
    names = {"loss.png", "lr.png", "weights.png", "attention.png", "summary.png"}
    assert {p.name for p in (run_dir / "plots").iterdir()} == names
    for name in names:
        path = run_dir / "plots" / name
        width, height = png_size(path)
        assert 400 <= width <= 2000 and 300 <= height <= 2000, (name, width, height)
        assert path.stat().st_size > 5_000, name
    assert len(capsys.readouterr().out.strip().splitlines()) == 5


def test_the_end_of_a_run_says_where_its_plots_are(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY_RUN, "--data-root", str(tmp_path / "data"), "--out-dir", str(run)]) == 0
    assert f"plots: {run / 'plots'} (summary.png: the run at a glance)" in capsys.readouterr().out
    assert png_size(run / "plots" / "summary.png")[0] >= 800


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


def test_weight_histograms_take_any_tensor(tmp_path):
    """The crash of a 2-step 30m run: LayerNorm gains 1 +- 1e-7 cannot make 80 float32 bins."""
    gains = torch.linspace(1 - 1e-7, 1 + 1e-7, 384)  # as after two steps at lr 5e-7
    state = {
        "transformer.wte.weight": torch.full((50, 4), 0.02),  # constant
        "transformer.h.0.attn.c_attn.weight": torch.tensor([1.0, float("nan"), float("inf"), 2.0]),
        "transformer.h.0.mlp.c_fc.weight": torch.tensor([float("nan")] * 3),
        "transformer.h.0.ln_1.weight": gains,
    }
    titles = []
    real_set_title = matplotlib.axes.Axes.set_title

    def set_title(ax, label, *a, **k):
        titles.append(label)
        return real_set_title(ax, label, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.axes.Axes, "set_title", set_title)
        png_size(plots.plot_weights(state, tmp_path / "weights.png"))
        assert "mean 0.02, std 0" in titles[0]
        assert "2 non-finite left out" in titles[1]
        assert "no finite values (3 NaN / inf)" in titles[2]
        assert "mean 1, std " in titles[3] and "non-finite" not in titles[3]
        widest = {"transformer.h.0.ln_1.weight": torch.tensor([-3e38, 3e38, 0.0])}
        png_size(plots.plot_weights(widest, tmp_path / "widest.png"))
        assert "mean 0, std 2.45e+38" in titles[-1] and "attention (c_attn, c_proj): none" in titles


def test_a_plot_that_fails_is_one_warning_and_the_run_succeeds(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("Too many bins for data range.\nsecond line")

    monkeypatch.setattr(plots, "plot_weights", broken)
    run = tmp_path / "run"
    assert main([*TINY_RUN, "--data-root", str(tmp_path / "data"), "--out-dir", str(run),
                 "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {run / 'plots' / 'weights.png'} not drawn "
                   "(ValueError: Too many bins for data range.)"]
    assert {p.name for p in (run / "plots").iterdir()} == {"loss.png", "lr.png", "attention.png",
                                                           "summary.png"}
    assert checkpoint.load(run / "ckpt.pt")["step"] == 2


@pytest.fixture(scope="module")
def stories_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare(Source.of(stories=300), root)
    return root


@pytest.mark.parametrize("name", list(PRESETS))
def test_two_step_run_of_each_preset_draws_its_plots(name, stories_root, tmp_path, capsys):
    """The issue's command (a 30m run crashed in its weights histogram after 2 steps), on 300
    stories and with one evaluation fewer."""
    run = tmp_path / "run"
    assert main(["--dataset", "stories", "--preset", name, "--stories", "300", "--max-iters", "2",
                 "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2",
                 "--device", "cpu", "--data-root", str(stories_root), "--out-dir", str(run),
                 "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    for png in ("loss.png", "lr.png", "weights.png", "attention.png", "summary.png"):
        width, height = png_size(run / "plots" / png)
        assert width >= 400 and height >= 300
    ckpt = checkpoint.load(run / "ckpt.pt")
    assert ckpt["step"] == 2 and ckpt["model_config"] == PRESETS[name].to_dict()
    assert [m["step"] for m in plots.read_metrics(run / "metrics.jsonl")] == [0, 2]
