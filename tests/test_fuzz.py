"""Fuzzing with hypothesis: the three CLI parsers, and token ids at every backend.

(The tokenizer round trip is fuzzed in test_reliability.py.)
- Random argv lists, built from each parser's real flags and random values, either parse
  or end in SystemExit(2); what the CLI checks next (train's ``resolve``, generate's
  ``read_prompts``, export's ``check_request``) raises nothing but ``SlmError``. No training,
  export or generation runs.
- Random prompts (batch, lengths past the context window, ids anywhere in the vocabulary)
  and output lengths through eager, naive, torchscript and ort on a tiny export: tokens
  come back in range, no more than asked for; ids outside [0, vocab) are a ValueError
  from the shared generation loop, never an IndexError or a crash in a runtime. compiled
  is left out: its first torch.compile takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slm_export.cli import export as export_cli
from slm_export.cli import generate as generate_cli
from slm_export.cli import train as train_cli
from slm_export.config import GPTConfig
from slm_export.errors import SlmError
from slm_export.export import check_request
from slm_export.model import GPT
from slm_export.runtime import GREEDY, SamplingConfig, backend_for_model, generate, load_backend

VALUES = st.one_of(
    st.sampled_from(["0", "1", "-1", "2", "1e-3", "-0.5", "nan", "inf", "", "tiny", "30m",
                     "cpu", "cuda", "auto", "eager", "ort", "int8", "fp16", "stories",
                     "rebase", "slide", "all", "x" * 300, "nope/ckpt.pt"]),
    st.text(max_size=12),
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True).map(str),
)


def flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")]


def argv_strategy(parser: argparse.ArgumentParser):
    token = st.one_of(st.sampled_from(flags(parser)), VALUES)
    return st.lists(token, max_size=8)


def parse_or_exit_2(parser, argv, capsys):
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        assert e.code == 2, (argv, e.code)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
        return None


FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_train_parser_and_resolve(data, capsys, tmp_path):
    parser = train_cli.build_parser()
    args = parse_or_exit_2(parser, data.draw(argv_strategy(parser)), capsys)
    if args is not None:
        if args.out_dir is None or args.resume:  # never read a real run folder
            args.out_dir = tmp_path / "run"
        try:
            train_cli.resolve(args)
        except SlmError as e:
            assert "\n" not in str(e)


@FUZZ
@given(data=st.data())
def test_generate_parser_and_prompts(data, capsys):
    parser = generate_cli.build_parser()
    args = parse_or_exit_2(parser, data.draw(argv_strategy(parser)), capsys)
    if args is not None:
        try:
            prompts = generate_cli.read_prompts(args)
            assert prompts and all(p.strip() for p in prompts)
        except SlmError as e:
            assert "\n" not in str(e)


@FUZZ
@given(data=st.data())
def test_export_parser_and_checks(data, capsys):
    parser = export_cli.build_parser()
    args = parse_or_exit_2(parser, data.draw(argv_strategy(parser)), capsys)
    if args is not None:
        try:
            check_request(export_cli.FORMATS[args.format],
                          [*args.quantize, *([args.dtype] if args.dtype != "fp32" else [])],
                          args.opset)
        except SlmError as e:
            assert "\n" not in str(e)


# -- token ids at every backend --------------------------------------------------------------

CONFIG = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
BACKENDS = ("eager", "naive", "torchscript", "ort")


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    from slm_export.export import build

    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    folder = tmp_path_factory.mktemp("fuzz") / "export"
    build(model, folder, verify=False)
    made = {name: backend_for_model(name, model) for name in ("eager", "naive")}
    made.update({name: load_backend(name, folder) for name in ("torchscript", "ort")})
    return made


PROMPTS = st.lists(st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=1, max_size=40),
                   min_size=1, max_size=3)


@settings(max_examples=25, deadline=None)
@given(prompts=PROMPTS, new=st.integers(1, 24), overflow=st.sampled_from(["rebase", "slide"]),
       greedy=st.booleans(), seed=st.integers(0, 2**31))
def test_random_ids_at_every_backend(backends, lockstep, prompts, new, overflow, greedy, seed):
    sampling = GREEDY if greedy else SamplingConfig(temperature=1.0, top_k=50)
    outs = {}
    for name in BACKENDS:
        g = torch.Generator().manual_seed(seed)
        out = generate(backends[name], prompts, max_new_tokens=new, sampling=sampling,
                       generator=g, overflow=overflow, stop_id=None)
        assert [len(t) for t in out.tokens] == [new] * len(prompts)
        assert all(0 <= t < CONFIG.vocab_size for row in out.tokens for t in row)
        outs[name] = out.tokens
    if greedy:  # whole continuations: every step's logits and token, ties allowed for
        for name in BACKENDS[1:]:  # (random weights give near-uniform logits)
            lockstep(backends["eager"], backends[name], prompts, max_new_tokens=new,
                     overflow=overflow)
