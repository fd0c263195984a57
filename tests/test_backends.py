"""The backends behind the runtime contract (runtime/base.py and each backend's file): greedy
parity with eager on the trained model (varied text, where a random model repeats a few
tokens with near-uniform logits), the contract's operations, loading through the registry."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from slm_export import registry
from slm_export.artifacts import kv_layout
from slm_export.errors import SlmError
from slm_export.inductor_cpu import cpp_gemm_available
from slm_export.runtime import (
    GREEDY,
    backend_for_model,
    generate,
    load_backend,
    resolve_model_path,
)
from slm_export.runtime.base import FunctionalCached, WindowPool, left_pad

PARITY_TOKENS = 64
ALL = ["eager", "naive", "compiled", "torchscript", "ort"]


@pytest.fixture(scope="session")
def backends(trained_backends):
    return trained_backends


@pytest.fixture(scope="session")
def eager_greedy(backends, prompt_ids):
    out = generate(backends["eager"], prompt_ids, max_new_tokens=PARITY_TOKENS,
                   sampling=GREEDY, stop_id=None)
    # Real, varied text (a random-weights model gives 1-4 distinct tokens per row).
    assert min(len(set(row)) for row in out.tokens) >= 15, out.tokens
    assert len({tuple(row) for row in out.tokens}) == len(prompt_ids)
    return out


def assert_eager_text_until_ties(tokens, want, ties):
    """Each row is ``want``'s row, up to its first tie (where either token is right)."""
    for row, (got, ref, tie) in enumerate(zip(tokens, want, ties, strict=True)):
        assert got[:tie] == ref[:tie], f"row {row} (first tie at {tie})"


# -- greedy parity ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["naive", "compiled", "torchscript", "ort"])
def test_greedy_parity_with_eager(name, backends, prompt_ids, eager_greedy, lockstep):
    """Ten prompts (a left-padded batch) x 64 tokens of varied text: every step's logits
    within 5e-5 x their std of eager's, every token eager's argmax (or a tie within that)."""
    r = lockstep(backends["eager"], backends[name], prompt_ids, max_new_tokens=PARITY_TOKENS)
    assert sum(t is not None for t in r.ties) <= 1  # ort meets one tie (gap 1e-6) here
    assert_eager_text_until_ties(r.generation.tokens, eager_greedy.tokens, r.ties)


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_reduced_precision_agrees_with_eager(variant, backends, trained_export, prompt_ids, lockstep):
    """The int8 / fp16 cache graphs' own greedy continuations of the ten prompts: eager,
    teacher-forced along them, picks the same token nearly everywhere; fp16's logits stay
    within 2% of their std (the export's fp16 tolerance)."""
    backend = load_backend("ort", trained_export, variant=variant)
    r = lockstep(backends["eager"], backend, prompt_ids, max_new_tokens=PARITY_TOKENS,
                 rel_tol=0.02 if variant == "fp16" else None)
    assert r.agreement >= (0.99 if variant == "fp16" else 0.95), r.agreement


@pytest.mark.parametrize("overflow", ["rebase", "slide"])
@pytest.mark.parametrize("name", ["naive", "compiled", "torchscript", "ort"])
def test_overflow_policies_agree_across_backends(name, overflow, backends, prompt_ids, lockstep):
    """Across the window (a few overflow steps after 124 decodes), a left-padded batch."""
    rows = prompt_ids[:2]
    kw = dict(max_new_tokens=140, sampling=GREEDY, overflow=overflow, stop_id=None)
    want = generate(backends["eager"], rows, **kw)
    r = lockstep(backends["eager"], backends[name], rows, max_new_tokens=140, overflow=overflow)
    assert_eager_text_until_ties(r.generation.tokens, want.tokens, r.ties)
    assert r.generation.stats.prefills == want.stats.prefills > 1


def test_a_broken_backend_fails_the_parity_check(backends, prompt_ids, lockstep):
    """The check the tests above rely on: logits off by a little more than float noise fail."""

    class Off(type(backends["eager"])):
        def _forward(self, rows, state, every):
            logits, cache = super()._forward(rows, state, every)
            return logits + 1e-3 * logits.std() * torch.randn_like(logits), cache

    broken = Off(backends["eager"].model)
    with pytest.raises(SlmError, match="max |logit diff|"):
        lockstep(backends["eager"], broken, prompt_ids[:2], max_new_tokens=8)


class SessionRun(FunctionalCached):
    """The plain ``session.run`` reference for the ort backend: numpy feeds by name, no IO
    binding, positions rebuilt from the mask at every call."""

    name = "session-run"
    always_mask = True

    def __init__(self, backend):
        self.session, self.config, self.device = backend.session, backend.config, backend.device
        self.kv_dtype = torch.float16 if "float16" in self.session.get_inputs()[3].type else torch.float32

    def _empty(self, B):
        c = self.config
        return (torch.zeros(B, c.n_head, 0, c.head_dim, dtype=self.kv_dtype),) * (2 * c.n_layer)

    def _forward(self, rows, state, every):
        from slm_export.model import positions_from_mask

        n = state.length + rows.size(1)
        mask = state.mask[:, :n]
        pos = positions_from_mask(mask)[:, -rows.size(1):]
        feeds = {"input_ids": rows.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy(),
                 "logits_to_keep": np.array(rows.size(1) if every else 1),
                 **{k: t.numpy() for k, t in zip(kv_layout.past_names(self.config.n_layer),
                                                  state.cache, strict=True)}}
        logits, *present = self.session.run(None, feeds)
        return torch.from_numpy(logits).float(), tuple(torch.from_numpy(t) for t in present)


@pytest.mark.parametrize("variant", ["fp32", "int8", "int4", "fp16"])
def test_io_binding_matches_session_run(variant, trained_export, prompt_ids):
    """The IO-binding path (the same lines that run on CUDA) against plain session.run on
    the same session: a ragged batch, a single row, across the window."""
    backend = load_backend("ort", trained_export, variant=variant)
    reference = SessionRun(backend)
    kw = dict(max_new_tokens=140, sampling=GREEDY, stop_id=None)
    for rows in (prompt_ids[:3], prompt_ids[3:4]):
        got, want = generate(backend, rows, **kw), generate(reference, rows, **kw)
        assert got.tokens == want.tokens and got.stats.prefills == want.stats.prefills > 1
    ids, mask = left_pad(prompt_ids[:3])
    with torch.inference_mode():
        have, s_have = backend.prefill(ids, mask)
        want, s_want = reference.prefill(ids, mask)
        for token in (262, 3290, 13):
            torch.testing.assert_close(have, want, atol=1e-5, rtol=0)
            have, s_have = backend.forward(torch.tensor([token] * 3), s_have)
            want, s_want = reference.forward(torch.tensor([token] * 3), s_want)
    assert s_have.cache[0][0].dtype == (torch.float16 if variant == "fp16" else torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["eager", "compiled", "torchscript", "ort"])
def test_cuda_greedy_parity(name, trained_model, backends, trained_export, prompt_ids, eager_greedy,
                            lockstep):
    """On a GPU (ORT's CUDA provider without TF32): eager's tokens, ties aside."""
    import copy

    if name == "ort":
        backend = load_backend("ort", trained_export, "cuda")
        assert backend.session.get_providers()[0] == "CUDAExecutionProvider"
    elif name == "torchscript":  # traced on the CPU, run on CUDA
        backend = load_backend("torchscript", trained_export, "cuda")
    else:
        backend = backend_for_model(name, copy.deepcopy(trained_model).cuda())
    r = lockstep(backends["eager"], backend, prompt_ids, max_new_tokens=PARITY_TOKENS, rel_tol=2e-4)
    assert_eager_text_until_ties(r.generation.tokens, eager_greedy.tokens, r.ties)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["eager", "compiled", "torchscript", "ort"])
def test_cuda_logits_are_the_callers(name, trained_model, trained_export):
    """A CUDA graph writes its outputs into one buffer: compiled hands out copies, so logits
    from one call survive the next on every backend."""
    import copy

    if registry.backend(name).from_checkpoint:
        backend = backend_for_model(name, copy.deepcopy(trained_model).cuda())
    else:
        backend = load_backend(name, trained_export, "cuda")
    with torch.inference_mode():
        _, state = backend.prefill(torch.tensor([[7454, 2402, 257]]), None)
        first, state = backend.forward(torch.tensor([640]), state)
        kept = first.clone()
        for token in (11, 262, 13):
            _, state = backend.forward(torch.tensor([token]), state)
    torch.testing.assert_close(first, kept, atol=0, rtol=0)


# -- the contract -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_forward_of_k_tokens_equals_k_single_steps(name, backends, prompt_ids):
    backend = backends[name]
    ids, mask = left_pad(prompt_ids[:3])
    new = torch.tensor([[262, 3290, 13], [314, 550, 11], [1110, 318, 257]])
    with torch.inference_mode():
        _, state = backend.prefill(ids, mask)
        every, s_every = backend.forward(new, state, every=True)
        _, state = backend.prefill(ids, mask)
        singles = []
        for k in range(3):
            one, state = backend.forward(new[:, k], state)
            singles.append(one)
    torch.testing.assert_close(every, torch.stack(singles, 1), atol=1e-4, rtol=0)
    assert s_every.length == state.length == ids.size(1) + 3


@pytest.mark.parametrize("name", ["eager", "naive", "torchscript", "ort"])
def test_a_state_is_a_value(name, backends, prompt_ids):
    """A step returns a new state and leaves the old one usable (a rewind is free)."""
    backend = backends[name]
    ids = torch.tensor([prompt_ids[0]])
    with torch.inference_mode():
        _, start = backend.prefill(ids, None)
        first, _ = backend.forward(torch.tensor([262]), start)
        backend.forward(torch.tensor([11]), start)  # another branch
        again, _ = backend.forward(torch.tensor([262]), start)
    assert start.length == ids.size(1)
    torch.testing.assert_close(again, first, atol=0, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_select_and_merge_continue_each_row_as_it_was(name, backends, prompt_ids):
    """Two prompts prefilled apart and merged (left-padded to the longer), then a row selected
    out of a batch (its padding columns dropped): each row's next logits are the ones it gets
    alone, and logits stay the caller's after later calls."""
    backend = backends[name]
    a, b = torch.tensor([prompt_ids[2]]), torch.tensor([prompt_ids[0]])
    with torch.inference_mode():
        want_a, sa = backend.forward(torch.tensor([262]), backend.prefill(a, None)[1])
        want_b, sb = backend.forward(torch.tensor([262]), backend.prefill(b, None)[1])
        kept = want_a.clone()
        merged = backend.merge([backend.prefill(a, None)[1], backend.prefill(b, None)[1]])
        assert (merged.batch, merged.length) == (2, a.size(1))
        both, merged = backend.forward(torch.tensor([262, 262]), merged)
        torch.testing.assert_close(both, torch.cat([want_a, want_b]), atol=1e-4, rtol=0)
        only_b = backend.select(merged, [1])
        assert only_b.length == b.size(1) + 1  # the columns only a's tokens filled are gone
        next_b, _ = backend.forward(torch.tensor([13]), only_b)
        again_b, _ = backend.forward(torch.tensor([13]), sb)
        torch.testing.assert_close(next_b, again_b, atol=1e-4, rtol=0)
        swapped = backend.select(merged, [1, 0])
        pair, _ = backend.forward(torch.tensor([13, 13]), swapped)
        torch.testing.assert_close(pair[0], again_b[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(want_a, kept, atol=0, rtol=0)  # not overwritten by later calls


def test_a_window_is_lent_again_once_no_state_holds_it():
    pool = WindowPool(lambda B: (torch.zeros(B, 1, 4, 1),))
    first = pool.lend(2)
    tensors = first.tensors
    second = pool.lend(2)
    assert second.tensors[0] is not tensors[0]  # the first is still held
    del first
    assert pool.lend(2).tensors[0] is tensors[0]
    assert pool.lend(3).tensors[0].size(0) == 3


def test_compiled_serves_more_batch_sizes_than_dynamos_default_limit():
    """dynamo's graphs are kept per function for the whole process and ``fullgraph=True``
    turns its recompile limit (8 by default) into a hard error: a server using nine batch
    sizes, or a test session with many models, used to fail. With the limit lowered to 1 for
    this test, two batch sizes through one backend still run (the backend raises it), and a
    new window of a known batch size compiles nothing (windows are plain tensor inputs)."""
    from torch._dynamo.utils import counters

    from slm_export.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    backend = backend_for_model("compiled", model)
    eager = backend_for_model("eager", model)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    with torch._dynamo.config.patch(recompile_limit=1):
        for rows in (1, 2):
            out = generate(backend, prompts[:rows], max_new_tokens=3, sampling=GREEDY, stop_id=None)
            want = generate(eager, prompts[:rows], max_new_tokens=3, sampling=GREEDY, stop_id=None)
            assert out.tokens == want.tokens
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        _, held = backend.prefill(torch.tensor([[1, 2, 3]]), None)  # holds one window of size 1
        out = generate(backend, prompts[:1], max_new_tokens=3, sampling=GREEDY, stop_id=None)
    assert out.tokens == want.tokens[:1] and counters["stats"]["unique_graphs"] == graphs


def test_compiled_decodes_a_token_view_without_recompiling():
    """After a verify step the loop feeds the last column of its tokens (``tokens[:, -1]``: a
    view with a stride and an offset). dynamo guards on both: without a copy, each draft count
    compiled the decode graph again."""
    from torch._dynamo.utils import counters

    from slm_export.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    backend, eager = backend_for_model("compiled", model), backend_for_model("eager", model)
    prompt = torch.tensor([[1, 2, 3]])
    _, state = backend.forward(torch.tensor([4]), backend.prefill(prompt, None)[1])
    _, want = eager.forward(torch.tensor([4]), eager.prefill(prompt, None)[1])
    graphs = counters["stats"]["unique_graphs"]
    for k in (2, 3, 4):
        column = torch.arange(5, 5 + k).view(1, k)[:, -1]
        logits, state = backend.forward(column, state)
        expected, want = eager.forward(column, want)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.skipif(not cpp_gemm_available(), reason="inductor has no vector ISA on this CPU")
def test_compiled_multiplies_a_few_rows_with_inductors_cpp_gemm_template():
    """On the CPU the decode and score graphs (a few rows per matmul) compile with inductor's
    C++ GEMM template, MKL's packed GEMM being slow there; the prefill graph keeps the
    default (a compile less). Called with grad on on purpose: a graph with autograd has no
    frozen weights, which the template needs (the backend runs its calls under ``no_grad``;
    without, this compile fails)."""
    from torch._dynamo.utils import counters

    from slm_export.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    backend, eager = backend_for_model("compiled", model), backend_for_model("eager", model)
    counters.clear()
    _, state = backend.prefill(torch.tensor([[1, 2, 3]]), None)
    assert counters["inductor"]["cpp_templated_kernel_counter"] == 0
    _, state = backend.forward(torch.tensor([4]), state)
    after_decode = counters["inductor"]["cpp_templated_kernel_counter"]
    assert after_decode > 0
    logits, _ = backend.forward(torch.tensor([[5, 6]]), state, every=True)
    assert counters["inductor"]["cpp_templated_kernel_counter"] > after_decode
    _, want = eager.forward(torch.tensor([4]), eager.prefill(torch.tensor([[1, 2, 3]]), None)[1])
    torch.testing.assert_close(logits, eager.forward(torch.tensor([[5, 6]]), want, every=True)[0],
                               atol=1e-4, rtol=1e-4)


def test_ort_on_cuda_asks_for_fp32_matmuls_without_tf32():
    """The CUDA provider's options (built the same on every machine): our stream, and TF32
    off unless asked for (its default is on, which moves fp32 logits past the export's
    tolerance)."""
    from slm_export.runtime.ort import cuda_provider_options

    options = cuda_provider_options(1, 1234)
    assert options == {"device_id": "1", "has_user_compute_stream": "1",
                       "user_compute_stream": "1234", "use_tf32": "0"}
    assert cuda_provider_options(0, 1, tf32=True)["use_tf32"] == "1"


# -- loading ------------------------------------------------------------------------------------

def test_resolve_model_path(tmp_path, tiny_ckpt, trained_export):
    run = tmp_path / "run"  # a run folder: best.pt and export/ (only what resolving reads)
    (run / "export").mkdir(parents=True)
    shutil.copy(tiny_ckpt, run / "best.pt")
    shutil.copy(trained_export / "manifest.json", run / "export")
    (run / "export" / "model_kv.ts").touch()
    export_dir = run / "export"
    assert resolve_model_path("eager", run) == run / "best.pt"
    assert resolve_model_path("eager", export_dir) == run / "best.pt"
    assert resolve_model_path("ort", run) == export_dir
    assert resolve_model_path("torchscript", export_dir / "model_kv.ts") == export_dir
    with pytest.raises(SlmError, match="unknown backend"):
        resolve_model_path("tensorrt", run)
    with pytest.raises(SlmError, match="model not found"):
        resolve_model_path("eager", tmp_path / "nope")
    with pytest.raises(SlmError, match="no export"):
        resolve_model_path("ort", tmp_path)
    with pytest.raises(SlmError, match="needs an export folder"):
        resolve_model_path("torchscript", tiny_ckpt)


def test_the_registry_decides_what_loads(tiny_ckpt, trained_export):
    """Variants and options are the registry's and the backend constructors' business: a
    variant another backend serves, or an option the backend does not take, is one line."""
    with pytest.raises(SlmError, match="--variant int4 applies to the ort backend only"):
        load_backend("eager", tiny_ckpt, variant="int4")
    with pytest.raises(SlmError, match="--variant int8 applies to the ort and executorch backends only"):
        load_backend("eager", tiny_ckpt, variant="int8")
    with pytest.raises(SlmError, match="backend eager takes no option 'threads'"):
        load_backend("eager", tiny_ckpt, threads=1)
    assert load_backend("ort", trained_export, variant="int4", threads=1).session \
        .get_session_options().intra_op_num_threads == 1
    assert registry.cases() == [(s.name, v) for s in registry.BACKENDS.values() for v in s.variants]
    assert ("ort", "int8") not in registry.cases("cuda")
    assert registry.formats_for(["ort", "aoti", "eager", "ort"]) == ["onnx", "aoti"]
