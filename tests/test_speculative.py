"""Speculative decoding in the one loop: greedy output identical to plain greedy on every
backend (a trained model, ragged batch, across a rebase), and sampling that keeps the
target's distribution exactly (a statistical test on a 4-token vocabulary)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from slm_export.config import GPTConfig
from slm_export.model import GPT
from slm_export.runtime import GREEDY, SamplingConfig, backend_for_model, generate, load_backend
from slm_export.runtime.ngram_table import NgramTable
from slm_export.runtime.speculative import ModelDrafter, NgramDrafter, load_draft
from slm_export.tokenizer import encode

pytestmark = pytest.mark.slow
PROMPTS = ["Once upon a time, there was a little girl named Mia. Mia loved to",
           "Tom had a red ball.", "One day,"]


@pytest.fixture(scope="module")
def trained(trained_model, trained_export):
    return trained_model, trained_export


@pytest.fixture(scope="module")
def table(trained_data):
    return NgramTable.from_data(trained_data)


@pytest.mark.parametrize("name", ["eager", "naive", "torchscript", "ort", "compiled"])
def test_greedy_speculation_is_plain_greedy(name, trained_backends, tiny_model, table):
    backend = trained_backends[name]  # shared with tests/test_runtime.py: compiled compiles once
    rows = [encode(p) for p in PROMPTS]
    kw = dict(max_new_tokens=180, sampling=GREEDY, stop_id=None)
    plain = generate(backend, rows, **kw)
    assert len({tuple(r[:40]) for r in plain.tokens}) == 3 and len(set(plain.tokens[0])) > 20
    ngram = generate(backend, rows, drafter=NgramDrafter(), draft_tokens=4, **kw)
    assert ngram.tokens == plain.tokens and ngram.stats.prefills == plain.stats.prefills > 1
    assert ngram.stats.accepted > 0 and ngram.stats.verify_steps < plain.stats.decodes
    # With the training text's n-grams where a row has no repeat: more drafts kept.
    counted = generate(backend, rows, drafter=NgramDrafter(table=table), draft_tokens=4, **kw)
    assert counted.tokens == plain.tokens
    assert counted.stats.accepted > 1.2 * ngram.stats.accepted
    # An unrelated random draft model: nearly every draft is rejected and rewound (drafting
    # all 3 each step, however unsure it is).
    draft = ModelDrafter(backend_for_model("eager", tiny_model), min_confidence=0)
    bad = generate(backend, rows, drafter=draft, draft_tokens=3, **kw)
    assert bad.tokens == plain.tokens and bad.stats.acceptance < 0.2
    alone = generate(backend, rows[:1], drafter=NgramDrafter(), draft_tokens=4, **kw)
    assert alone.tokens[0] == generate(backend, rows[:1], **kw).tokens[0]
    # With the penalties on, greedy speculation is still plain greedy (under the penalties).
    penalized = dict(kw, sampling=SamplingConfig(temperature=0, top_k=None, presence_penalty=0.5,
                                                 frequency_penalty=0.3, repetition_penalty=1.2))
    plain_penalized = generate(backend, rows, **penalized)
    assert plain_penalized.tokens != plain.tokens
    spec = generate(backend, rows, drafter=NgramDrafter(table=table), draft_tokens=4, **penalized)
    assert spec.tokens == plain_penalized.tokens and spec.stats.accepted > 0


def test_a_draft_model_that_agrees_is_accepted(trained):
    model, folder = trained
    rows = [encode(p) for p in PROMPTS]
    kw = dict(max_new_tokens=100, sampling=GREEDY, stop_id=None)
    target = load_backend("ort", folder)
    out = generate(target, rows, drafter=ModelDrafter(backend_for_model("eager", model)),
                   draft_tokens=4, **kw)
    assert out.tokens == generate(target, rows, **kw).tokens
    assert out.stats.acceptance > 0.9  # the same weights draft: only rounding may differ


@pytest.mark.parametrize("variant", ["fp32", "int8", "int4"])
def test_a_draft_vocabulary_cuts_the_lm_head_and_keeps_the_guesses(trained, trained_data, variant):
    """An ort draft restricted to the training text's frequent tokens (runtime.draft_vocab):
    its logits are the full graph's at those tokens, and drafting for its own model it is
    still accepted (its picks map back to token ids) with the same output."""
    from slm_export.runtime.draft_vocab import frequent_tokens

    _, folder = trained
    ids = frequent_tokens(trained_data, 300)
    assert 300 <= len(ids) <= 301 and 50256 in ids and bool((ids[1:] > ids[:-1]).all())
    target = load_backend("ort", folder)
    full = load_backend("ort", folder, variant=variant)
    cut = load_draft("ort", folder, target, variant, ids)
    assert cut.logits_width == len(ids) == cut.session.get_outputs()[0].shape[-1]
    x = torch.tensor([encode(PROMPTS[0]), encode(PROMPTS[0])[::-1]])
    want, _ = full.prefill(x)
    got, _ = cut.prefill(x)
    torch.testing.assert_close(got, want[:, ids], rtol=1e-5, atol=1e-5)
    rows = [encode(p) for p in PROMPTS]
    kw = dict(max_new_tokens=100, sampling=GREEDY, stop_id=None)
    out = generate(target, rows, drafter=ModelDrafter(cut), draft_tokens=4, **kw)
    assert out.tokens == generate(target, rows, **kw).tokens
    assert out.stats.acceptance > 0.5  # the same model (int4: 0.75); unmapped picks: ~0


def test_frequent_tokens_ranks_a_data_folder(trained_data, tmp_path):
    import numpy as np

    from slm_export.data import TokenData
    from slm_export.errors import SlmError
    from slm_export.runtime.draft_vocab import frequent_tokens

    counts = np.bincount(TokenData(trained_data).tokens("train"), minlength=50257)
    top = frequent_tokens(trained_data, 5)
    assert set(top.tolist()) == {*np.argsort(-counts, kind="stable")[:5].tolist(), 50256}
    everything = frequent_tokens(trained_data, 50257)  # only tokens the text has
    assert set(everything.tolist()) == {*np.flatnonzero(counts).tolist(), 50256}
    with pytest.raises(SlmError, match="no meta.json"):
        frequent_tokens(tmp_path, 5)


def test_an_ngram_table_counts_followers_and_drafts_from_the_longest_context():
    #         0  1  2  3  4  5  6  7  8  9 10 11 12 13
    stream = [5, 1, 2, 4, 9, 1, 2, 4, 7, 1, 2, 3, 9, 1]
    table = NgramTable(np.array(stream, dtype=np.uint16), min_share=0.6)
    assert table.next_token([8, 1, 2]) == 4  # (1, 2): 4 twice, 3 once; (8, 1, 2) unseen
    assert table.next_token([9, 1, 2]) == 4  # (9, 1, 2) -> 4 once only: below min_count
    assert table.next_token([2]) == 4 and table.next_token([6]) is None
    assert table.next_token([4]) is None  # 9 and 7 once each: 50% < min_share
    assert table.draft([0, 9, 1], 5) == [2, 4]  # then (1, 2, 4) -> 9 / 7 stops it
    assert table.draft([0, 9, 1], 1) == [2]
    assert table.draft(np.array([0, 9, 1], dtype=np.uint16), 2) == [2, 4]  # a data folder's dtype
    # The longest known context decides: (6, 1, 2) is split, so no draft, though (1, 2) -> 3.
    # A context seen once does not count: (8, 1, 2) -> 5 once, so (1, 2) -> 3 drafts.
    stream = [6, 1, 2, 3, 6, 1, 2, 4, 0, 1, 2, 3, 0, 1, 2, 3, 8, 1, 2, 5]
    table = NgramTable(np.array(stream, dtype=np.uint16), min_share=0.6)
    assert table.next_token([6, 1, 2]) is None and table.next_token([1, 2]) == 3
    assert table.next_token([8, 1, 2]) == 3 and table.next_token([0, 1, 2]) == 3


def test_an_ngram_table_matches_a_plain_count_of_a_data_folder(trained_data, table, tmp_path):
    from collections import Counter, defaultdict

    from slm_export.data import TokenData
    from slm_export.errors import SlmError

    tokens = TokenData(trained_data).tokens("train").tolist()
    followers = defaultdict(Counter)
    for n in (1, 2, 3):
        for i in range(len(tokens) - n):
            followers[tuple(tokens[i:i + n])][tokens[i + n]] += 1
    seen = [c for c, f in followers.items() if f.total() >= 2]
    assert len(table) == len(seen) > 1000
    for context in seen[::7]:
        (best, count), *_ = sorted(followers[context].items(), key=lambda tc: (-tc[1], -tc[0]))
        share_ok = count / followers[context].total() >= table.min_share
        assert table.next_token(list(context)) == (best if share_ok else None), context
    with pytest.raises(SlmError, match="no meta.json"):
        NgramTable.from_data(tmp_path)


# -- sampling keeps the distribution ------------------------------------------------------------

VOCAB = 4


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(7)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=1, n_embd=8,
                          dropout=0.0)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # ~1.1 nats a token: drafts are kept and rejected
    return model


def exact_joint(model, prompt, n=3, cfg: SamplingConfig | None = None):
    """p(x1..xn | prompt) for every sequence, from the full forward (with ``cfg``'s history
    controls applied at each position, counting the tokens before it as generated)."""
    from slm_export.runtime.sampling import adjust

    probs = {}
    for seq in itertools.product(range(VOCAB), repeat=n):
        ids = torch.tensor([prompt + list(seq)])
        with torch.no_grad():
            logits = model(ids, ids)[0][0].double()
        logp = 0.0
        for i, t in enumerate(seq):
            row = logits[len(prompt) - 1 + i]
            if cfg is not None:
                counts = torch.bincount(torch.tensor(seq[:i], dtype=torch.long), minlength=VOCAB).double()
                seen = torch.zeros(VOCAB, dtype=torch.bool)
                seen[torch.tensor(prompt + list(seq[:i]))] = True
                row = adjust(row, cfg, counts, seen).double()
            logp += torch.log_softmax(row, -1)[t].item()
        probs[seq] = math.exp(logp)
    return probs


class FixedDrafter(NgramDrafter):
    """Always proposes the same tokens: mostly wrong, so rejections and resampling run."""

    def propose(self, history, k):
        return [[0, 1, 2, 3][:k] for _ in history]


def chi_square(samples, probs):
    counts = dict.fromkeys(probs, 0)
    for s in samples:
        counts[s] += 1
    cells = [(counts[k], probs[k] * len(samples)) for k in probs if probs[k] * len(samples) >= 5]
    return sum((o - e) ** 2 / e for o, e in cells), len(cells) - 1


PENALIZED = SamplingConfig(temperature=1.0, top_k=None, presence_penalty=0.8,
                           frequency_penalty=0.4, repetition_penalty=1.3)


@pytest.mark.parametrize("drafter,cfg", [
    ("none", None), ("fixed", None), ("self", None), ("unsure", None),
    ("none", PENALIZED), ("fixed", PENALIZED), ("self", PENALIZED)])
def test_speculative_sampling_keeps_the_distribution(drafter, cfg, small):
    """Sampling with or without drafts, with or without the penalties (each verified position
    counts the drafts before it as generated): the joint of three tokens is the model's own
    (chi-square against the exact joint)."""
    prompt, rows, runs = [1, 2], 8, 500
    backend = backend_for_model("eager", small)
    make = {"none": lambda: None, "fixed": FixedDrafter,
            "self": lambda: ModelDrafter(backend_for_model("eager", small), min_confidence=0),
            "unsure": lambda: ModelDrafter(backend_for_model("eager", small),
                                           min_confidence=0.3)}[drafter]
    want = exact_joint(small, prompt, cfg=cfg)
    cfg = cfg or SamplingConfig(temperature=1.0, top_k=None)
    gen = torch.Generator().manual_seed(11)
    samples = []
    for _ in range(runs):
        out = generate(backend, [prompt] * rows, max_new_tokens=3, sampling=cfg, generator=gen,
                       stop_id=None, drafter=make(), draft_tokens=2)
        samples += [tuple(t) for t in out.tokens]
    chi2, df = chi_square(samples, want)
    assert df >= 10  # enough populated cells for the test to mean something
    assert chi2 < df + 5 * math.sqrt(2 * df), (chi2, df)  # mean + 5 sd of chi-square(df)


def test_a_draft_model_stops_drafting_where_it_is_unsure(small):
    """A step's drafts continue while the draft model gives its latest guess at least
    ``min_confidence``: the first draft always, the next ones only after confident ones."""
    backend = backend_for_model("eager", small)
    history = [[1, 2, 3, 0, 1]]
    full = ModelDrafter(backend, min_confidence=0).propose(history, 4)[0]
    assert len(full) == 4
    with torch.no_grad():  # the draft model's probability of each of its guesses
        p = [torch.softmax(small(torch.tensor([history[0] + full[:i]]))[0][0, -1], -1)[t].item()
             for i, t in enumerate(full)]
    # Thresholds just below each guess's probability (the full forward and the drafter's
    # cached one round differently at the last digits) and above every one.
    for threshold in (*(q - 1e-4 for q in p), 1.01):
        leading = next((i for i, q in enumerate(p[:3]) if q < threshold), 3)
        drafts = ModelDrafter(backend, min_confidence=threshold).propose(history, 4)[0]
        assert drafts == full[:1 + leading], (threshold, p)
    assert len({len(ModelDrafter(backend, min_confidence=t).propose(history, 4)[0])
                for t in (*(q - 1e-4 for q in p), 1.01)}) > 2  # they cut at different lengths


def test_an_ort_draft_on_the_cpu_runs_on_one_intra_op_thread(trained):
    """Two ORT thread pools spinning on the same cores slow each other (bench/RESULTS.md):
    the draft runs on the caller's thread, the target keeps its pool."""
    _, folder = trained
    target = load_backend("ort", folder)
    draft = load_draft("ort", folder, target, "int4")
    assert draft.session.get_session_options().intra_op_num_threads == 1
    assert target.session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    assert "int4" in str(draft.path)
