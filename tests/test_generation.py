"""runtime/generation.py, the one loop: ragged batches, per-row overflow, cropping, stop
rules, rows that join and leave (continuous batching), per-row sampling, host threads; on the
trained model (varied text) through eager, and on every backend where the backend matters."""

from __future__ import annotations

import math

import pytest
import torch

from slm_export.runtime import (
    GREEDY,
    SamplingConfig,
    TokenStream,
    backend_for_model,
    generate,
    load_backend,
    make_generator,
)
from slm_export.runtime.base import left_pad
from slm_export.tokenizer import EOT_ID, encode


@pytest.fixture(scope="module")
def rows(prompt_ids):
    return prompt_ids[:6]


@pytest.fixture(scope="module")
def eager(trained_backends):
    return trained_backends["eager"]


def alone(backend, prompt, new_tokens, **kw):
    return generate(backend, [prompt], max_new_tokens=new_tokens, sampling=GREEDY, stop_id=None,
                    **kw).tokens[0]


def test_seeding(eager, rows):
    cfg = SamplingConfig(temperature=1.0, top_k=50)

    def run(seed):
        return generate(eager, rows[:2], max_new_tokens=24, sampling=cfg,
                        generator=make_generator(seed)).tokens

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_a_padded_batch_across_the_window_gives_each_row_its_own_tokens(eager, rows):
    """Rows of different lengths in one left-padded batch, 150 tokens each: every row
    overflows when its own window is full (not when the batch's is), so each row is what it
    would be alone, overflow re-prefills included."""
    batch = generate(eager, rows, max_new_tokens=150, sampling=GREEDY, stop_id=None)
    for prompt, got in zip(rows, batch.tokens, strict=True):
        assert got == alone(eager, prompt, 150)
    assert batch.stats.prefills > len(set(map(len, rows)))  # several separate re-prefills


def _reference(model, prompt, steps, overflow):
    """Greedy by full recompute of a window: slide = nanoGPT's idx[:, -128:]; rebase = the
    window restarts from the last 64 tokens whenever it would pass 128."""
    seq, start, W = list(prompt[-128:]), 0, model.config.block_size
    with torch.inference_mode():
        for _ in range(steps):
            if overflow == "slide":
                start = max(0, len(seq) - W)
            elif len(seq) - start > W:
                start = len(seq) - W // 2
            logits, _ = model(torch.tensor([seq[start:]]))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt[-128:]):]


@pytest.mark.parametrize("overflow", ["rebase", "slide"])
def test_overflow_matches_full_recompute_reference(overflow, trained_model, eager):
    prompt = encode("Once upon a time, there was a girl.")
    steps = 200
    out = generate(eager, [prompt], max_new_tokens=steps, sampling=GREEDY, overflow=overflow,
                   stop_id=None)
    assert out.tokens[0] == _reference(trained_model, prompt, steps, overflow)
    first_full = 128 - len(prompt)  # decodes until the window is full
    if overflow == "rebase":  # then one prefill per 64 + 1 steps
        rebases = math.ceil((steps - 1 - first_full) / 65)
        assert out.stats.prefills == 1 + rebases == 3
    else:  # then a prefill at every step
        assert out.stats.prefills == 1 + (steps - 1 - first_full)
    assert out.stats.prefills + out.stats.decodes == steps


def test_long_prompt_is_cropped_to_the_window(eager):
    long = encode(" ".join(["the big dog ran to the park"] * 40))
    assert len(long) > 200
    assert alone(eager, long, 5) == alone(eager, long[-128:], 5)


def test_stops_at_endoftext_per_row(eager, rows):
    full = generate(eager, rows, max_new_tokens=40, sampling=GREEDY, stop_id=None).tokens
    stop = full[0][4]  # make one of row 0's greedy tokens the stop token
    out = generate(eager, rows, max_new_tokens=40, sampling=GREEDY, stop_id=stop)
    assert out.finish[0] == "eot" and len(out.tokens[0]) <= 4
    for row, want, finish in zip(out.tokens, full, out.finish, strict=True):
        if stop in want:
            assert (row, finish) == (want[:want.index(stop)], "eot")
        else:
            assert (row, finish) == (want, "length")
    assert EOT_ID == 50256


CONTINUOUS = ["eager", "naive", "compiled", "torchscript", "ort", "aoti"]


@pytest.fixture(scope="module")
def every_backend(trained_backends, trained_export):
    from slm_export.export.aoti import compiler_problem

    made = dict(trained_backends)
    if compiler_problem() is None:
        made["aoti"] = load_backend("aoti", trained_export)
    return made


@pytest.mark.parametrize("name", CONTINUOUS)
def test_rows_that_join_and_leave_get_their_own_tokens(name, every_backend, rows):
    """Continuous batching on every fp32 backend: rows join a running batch at different
    steps (prefilled, merged in), one leaves early (``finish``), the others cross the window
    (each row's overflow its own); each row's tokens are the ones it gets alone."""
    if name not in every_backend:
        pytest.skip("aoti: no C++ compiler here (no model_kv.pt2)")
    backend = every_backend[name]
    arrivals = {0: [rows[0], rows[2]], 9: [rows[1]], 30: [rows[5]]}
    stream, ids = TokenStream(backend), []
    for step in range(200):
        for prompt in arrivals.get(step, []):
            ids += stream.add([prompt], max_new_tokens=140, sampling=GREEDY, stop_id=None)
        if step == 20:
            stream.finish(ids[1], "cancelled")  # rows[2] leaves after 20 tokens
        if not stream.step():
            break
    got = {i: stream.rows[i].new_tokens for i in ids}
    assert stream.rows[ids[1]].finish == "cancelled" and len(got[ids[1]]) == 20
    eager = every_backend["eager"]
    for i, prompt in zip(ids, [rows[0], rows[2], rows[1], rows[5]], strict=True):
        assert got[i] == alone(eager, prompt, len(got[i])), f"row {i}"
    assert stream.live == [] and len(got[ids[3]]) == 140


def test_rows_sample_with_their_own_settings_and_generators(eager, rows):
    """Rows added apart sample apart: a seeded row gives the same text whatever runs beside
    it, a greedy row stays greedy, and each row's penalties count its own history."""
    seeded = SamplingConfig(temperature=1.0, top_k=50)
    want = generate(eager, rows[:1], max_new_tokens=30, sampling=seeded,
                    generator=make_generator(3)).tokens[0]
    penal = SamplingConfig(temperature=0, top_k=None, repetition_penalty=1.5)
    penal_alone = generate(eager, rows[1:2], max_new_tokens=30, sampling=penal).tokens[0]
    stream = TokenStream(eager)
    a = stream.add(rows[:1], max_new_tokens=30, sampling=seeded, generator=make_generator(3))[0]
    b = stream.add(rows[2:3], max_new_tokens=30, sampling=GREEDY)[0]
    c = stream.add(rows[1:2], max_new_tokens=30, sampling=penal)[0]
    for _ in stream:
        pass
    assert stream.rows[a].new_tokens == want
    assert stream.rows[b].new_tokens == generate(eager, rows[2:3], max_new_tokens=30,
                                                 sampling=GREEDY).tokens[0]
    assert stream.rows[c].new_tokens == penal_alone != alone(eager, rows[1], 30)
    stream.forget(a)
    assert a not in stream.rows


def test_a_logit_bias_forces_a_token_through_the_loop(eager, rows):
    cfg = SamplingConfig(temperature=0, top_k=None, logit_bias=((262, 100.0),))  # " the"
    out = generate(eager, rows[:2], max_new_tokens=5, sampling=cfg, stop_id=None)
    assert out.tokens == [[262] * 5] * 2


def test_the_loop_runs_on_the_backends_host_threads(trained_backends, rows, monkeypatch):
    """ort on the CPU asks for one torch thread while the loop drives it (its own pool does
    the arithmetic): every step, sampling and verifying included, runs under it, and
    torch's setting is back once the stream has run dry."""
    from slm_export.runtime import generation
    from slm_export.runtime.speculative import NgramDrafter

    ort_backend, eager = trained_backends["ort"], trained_backends["eager"]
    assert ort_backend.host_threads == 1 and getattr(eager, "host_threads", None) is None
    seen = []
    for name in ("sample", "accepted_runs"):
        real = getattr(generation, name)
        monkeypatch.setattr(generation, name, lambda *a, _real=real, **k: (
            seen.append(torch.get_num_threads()), _real(*a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plain = generate(ort_backend, rows[:2], max_new_tokens=8, sampling=GREEDY, stop_id=None)
        spec = generate(ort_backend, rows[:2], max_new_tokens=8, sampling=GREEDY,
                        stop_id=None, drafter=NgramDrafter(min_ngram=1))  # verifies in 8 tokens
        assert torch.get_num_threads() == 2
        generate(eager, rows[:1], max_new_tokens=2, sampling=GREEDY, stop_id=None)
    finally:
        torch.set_num_threads(before)
    assert spec.tokens == plain.tokens and spec.stats.verify_steps > 0
    assert set(seen[:-2]) == {1} and seen[-2:] == [2, 2] and len(seen) >= 11


def test_bad_prompts_are_refused(eager):
    stream = TokenStream(eager)
    with pytest.raises(ValueError, match="at least one token"):
        stream.add([[]], max_new_tokens=3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        stream.add([[50257]], max_new_tokens=3)
    assert stream.step() == {} and stream.live == []
    assert left_pad([[1], [2, 3]])[1].tolist() == [[0, 1], [1, 1]]


def test_a_random_model_row_alone_and_batched_on_a_small_window():
    """The same on a window of 16 tokens with short rows: many overflows per row."""
    from slm_export.config import GPTConfig
    from slm_export.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.0)).eval()
    backend = backend_for_model("eager", model)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11]]
    for overflow in ("rebase", "slide"):
        batch = generate(backend, prompts, max_new_tokens=40, sampling=GREEDY, stop_id=None,
                         overflow=overflow).tokens
        assert batch == [alone(backend, p, 40, overflow=overflow) for p in prompts]
