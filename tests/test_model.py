import pytest
import torch

from slm_export.config import PRESETS, GPTConfig, preset
from slm_export.errors import SlmError
from slm_export.model import GPT, positions_from_mask


def test_30m_parameter_count():
    model = GPT(PRESETS["30m"])
    # tied wte / lm_head counted once; 29,946,240 without the position table (nanoGPT's count)
    assert model.num_params() == 29_995_392
    assert model.transformer.wte.weight is model.lm_head.weight


def test_presets_and_config_validation():
    assert preset("tiny").vocab_size == 50257 and preset("tiny").block_size == 128
    with pytest.raises(SlmError, match="unknown preset"):
        preset("huge")
    with pytest.raises(SlmError, match="divisible"):
        GPTConfig(n_embd=100, n_head=6)
    assert GPTConfig.from_dict(PRESETS["30m"].to_dict()) == PRESETS["30m"]


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(PRESETS["30m"])
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 6) ** 0.5) < 5e-4
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 5e-4


def test_forward_loss_and_last_logits(tiny_model):
    idx = torch.randint(0, 50257, (2, 16))
    logits, loss = tiny_model(idx, idx)
    assert logits.shape == (2, 16, 50257)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert 9.5 < loss.item() < 13  # random init: close to ln(50257) = 10.8
    last, none = tiny_model(idx)
    assert none is None and last.shape == (2, 1, 50257)
    torch.testing.assert_close(last[:, 0], logits[:, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="block_size"):
        tiny_model(torch.zeros(1, 129, dtype=torch.long))


@pytest.fixture(scope="module")
def model_30m():
    torch.manual_seed(0)
    return GPT(PRESETS["30m"]).eval()


@pytest.mark.parametrize("length", [1, 2, 17, 64, 128])
@torch.no_grad()
def test_kv_cache_matches_full_forward(length, model_30m):
    torch.manual_seed(length)
    model = model_30m
    idx = torch.randint(0, 50257, (2, length))
    full, _ = model(idx)
    split = max(1, length // 3)
    logits, kv = model.forward_kv(idx[:, :split], model.empty_kv(2))
    for t in range(split, length):
        logits, kv = model.forward_kv(idx[:, t : t + 1], kv)
    assert len(kv) == 12 and all(t.shape == (2, 6, length, 64) for t in kv)
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)

    window, mask, last = model.empty_window(2), torch.ones(2, 128, dtype=torch.long), torch.tensor([0])
    logits = model.forward_static(idx[:, :split], torch.arange(split), window, mask,
                                  torch.tensor([split - 1]))
    for t in range(split, length):
        logits = model.forward_static(idx[:, t : t + 1], torch.tensor([t]), window, mask, last)
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_left_padded_batch_matches_single_sequences(tiny_model):
    torch.manual_seed(3)
    a, b = torch.randint(0, 50257, (1, 9)), torch.randint(0, 50257, (1, 5))
    idx = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    logits, kv = tiny_model.forward_kv(idx, tiny_model.empty_kv(2), mask)
    torch.testing.assert_close(logits[0, -1], tiny_model(a)[0][0, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, -1], tiny_model(b)[0][0, 0], atol=1e-5, rtol=0)
    nxt = torch.tensor([[7], [8]])
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    logits, kv = tiny_model.forward_kv(nxt, kv, mask)
    assert all(torch.isfinite(t).all() for t in kv)
    ref_b = tiny_model(torch.cat([b, nxt[1:]], 1))[0][0, 0]
    torch.testing.assert_close(logits[1, -1], ref_b, atol=1e-5, rtol=0)


@torch.no_grad()
def test_logits_to_keep_and_explicit_positions(tiny_model):
    """logits_to_keep K returns the last K positions (0: all); explicit position ids (as
    exported graphs take them) give what the mask implies."""
    from slm_export.model import positions_from_mask

    idx = torch.randint(0, 50257, (2, 12))
    full = tiny_model(idx, idx)[0]
    for keep, want in ((0, full), (1, full[:, -1:]), (5, full[:, -5:]), (torch.tensor(3), full[:, -3:])):
        logits, _ = tiny_model.forward_kv(idx, tiny_model.empty_kv(2), logits_to_keep=keep)
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    implied, _ = tiny_model.forward_kv(idx, tiny_model.empty_kv(2), mask, logits_to_keep=0)
    given, _ = tiny_model.forward_kv(idx, tiny_model.empty_kv(2), mask, positions_from_mask(mask), 0)
    torch.testing.assert_close(given, implied, atol=0, rtol=0)
    shifted, _ = tiny_model.forward_kv(idx, tiny_model.empty_kv(2), mask, positions_from_mask(mask) + 1, 0)
    assert not torch.allclose(shifted[1, 5:], implied[1, 5:], atol=1e-3)


def test_traced_graphs_take_the_device_from_their_inputs(tiny_model):
    """torch.jit.trace bakes `device=` arguments in as constants: a graph traced on the CPU
    must not build positions or masks on the CPU when its inputs live on CUDA."""
    from slm_export.export.torchscript import trace

    for traced in trace(tiny_model):
        assert 'Device = prim::Constant[value="cpu"]' not in str(traced.inlined_graph)


def test_blocked_head_is_a_tied_copy_with_the_same_outputs(tiny_model):
    """The eager backend runs a copy whose tied embedding / lm_head is in vocabulary blocks
    (model.blocked_head): one Parameter for both, every other Parameter shared, the same
    logits on every path, and the model it was given left as it was."""
    from slm_export.model import BlockedHead, blocked_head
    from slm_export.runtime import backend_for_model

    model = tiny_model.eval()
    head = model.lm_head.weight
    backend = backend_for_model("eager", model)
    blocked = backend.model
    assert model.lm_head.weight is head is model.transformer.wte.weight  # untouched
    assert isinstance(blocked.lm_head, BlockedHead)
    assert blocked.transformer.wte.weight is blocked.lm_head.weight
    assert blocked.lm_head.weight.shape == (32, model.config.n_embd, 1571)  # 50257 -> 32 * 1571
    ours = dict(blocked.named_parameters())
    for name, p in model.named_parameters():
        if "wte" not in name and "lm_head" not in name:
            assert ours[name] is p, name
    idx = torch.randint(0, 50257, (2, 9))
    idx[0, 0], idx[1, -1] = 0, 50256  # the first and last token of the vocabulary
    with torch.no_grad():
        want, _ = model(idx, idx)
        got, _ = blocked(idx, idx)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want_kv, _ = model.forward_kv(idx, model.empty_kv(2), logits_to_keep=3)
        got_kv, _ = blocked.forward_kv(idx, blocked.empty_kv(2), logits_to_keep=3)
        torch.testing.assert_close(got_kv, want_kv, rtol=1e-5, atol=1e-5)
    assert blocked_head(blocked) is blocked


def test_the_export_attention_op_runs_like_the_model(tiny_model):
    """KVModule with the ONNX export's fused attention op (export/attention_op.py) computes
    what the model's own cache path does, padded rows and an existing past included."""
    from slm_export.export.signatures import KVModule

    B, P, T = 3, 4, 5
    past = tiny_model.empty_kv(B)
    mask = torch.ones(B, P + T, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        _, past = tiny_model.forward_kv(torch.randint(0, 50257, (B, P)), past, mask[:, :P])
        args = (torch.randint(0, 50257, (B, T)), mask, positions_from_mask(mask)[:, P:], past,
                torch.tensor(0))
        want = KVModule(tiny_model)(*args)
        got = KVModule(tiny_model, fused_attention=True)(*args)
    assert len(got) == len(want) == 1 + 2 * tiny_model.config.n_layer
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
