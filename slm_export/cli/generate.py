"""`python generate.py`: sample text from a checkpoint or an export with any backend."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slm_export.cli.common import (
    ArgumentParser,
    add_runtime_args,
    entry_point,
    logit_bias,
    non_negative_float,
    penalty,
    positive_float,
    positive_int,
    probability,
    seed,
    unit_interval,
)
from slm_export.errors import SlmError

DEFAULT_MODEL = Path("artifacts/runs/latest")
SEPARATOR = "---------------"


def build_parser() -> ArgumentParser:
    from slm_export.registry import NAMES, VARIANTS
    from slm_export.runtime import OVERFLOW_POLICIES

    p = ArgumentParser(prog="generate.py", description=__doc__)
    add_runtime_args(p, default_backend="eager")
    p.add_argument("--model", type=Path, default=None,
                   help=f"checkpoint file, run folder or export folder (default {DEFAULT_MODEL})")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help='text to continue (default "Once upon a time")')
    src.add_argument("--prompt-file", type=Path, default=None,
                     help="UTF-8 file, one prompt per line (blank lines skipped), run as a batch")
    p.add_argument("--max-new-tokens", type=positive_int, default=200,
                   help="tokens to generate per sample (default 200; fewer if <|endoftext|> comes first)")
    p.add_argument("--temperature", type=non_negative_float, default=0.8,
                   help="softmax temperature; 0 means greedy (default 0.8)")
    p.add_argument("--top-k", type=positive_int, default=20,
                   help="sample among the k most likely tokens (default 20)")
    p.add_argument("--top-p", type=probability, default=None,
                   help="nucleus sampling: the most likely tokens holding this much probability")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=seed, default=None,
                   help="makes sampling reproducible (same seed, device and backend: same text)")
    p.add_argument("--num-samples", type=positive_int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print token by token (default: when stdout is a terminal)")
    p.add_argument("--overflow", choices=OVERFLOW_POLICIES, default="rebase",
                   help="past the context window: re-prefill the last half (rebase) or "
                        "recompute the last block_size tokens every step (slide); default rebase")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample before the first occurrence of TEXT (repeatable, up to 4)")
    _add_control_args(p)
    _add_speculative_args(p, NAMES, VARIANTS)
    return p


def _add_control_args(p: ArgumentParser) -> None:
    g = p.add_argument_group("sampling controls (as in OpenAI's API; every backend, speculation too)")
    g.add_argument("--min-p", type=unit_interval, default=None,
                   help="drop tokens less likely than this share of the most likely one")
    g.add_argument("--presence-penalty", type=penalty, default=0.0,
                   help="subtract this from every token generated before (-2..2)")
    g.add_argument("--frequency-penalty", type=penalty, default=0.0,
                   help="subtract this times its count from every token generated before (-2..2)")
    g.add_argument("--repetition-penalty", type=positive_float, default=1.0,
                   help="divide positive / multiply negative logits of every token seen, prompt "
                        "included, by this (CTRL's penalty; 1 = off)")
    g.add_argument("--logit-bias", type=logit_bias, action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (-100..100) to token ID's logit (repeatable)")


def _add_speculative_args(p: ArgumentParser, backends, variants) -> None:
    from slm_export.runtime.draft_vocab import DEFAULT_SIZE
    from slm_export.runtime.speculative import SPECULATIVE

    g = p.add_argument_group("speculative decoding (same output distribution, fewer passes)")
    g.add_argument("--speculative", choices=SPECULATIVE, default=None,
                   help="ngram: drafts from the text's own repeats (and --ngram-data); "
                        "draft: from --draft-model")
    g.add_argument("--ngram-data", type=Path, default=None, metavar="DATA_FOLDER",
                   help="ngram also drafts from the n-gram counts of this prepared data "
                        "folder's train split (e.g. the one the model trained on) where the "
                        "text has no repeat; the output never changes")
    g.add_argument("--draft-model", type=Path, default=None,
                   help="a smaller checkpoint or export of the same tokenizer (--speculative draft)")
    g.add_argument("--draft-backend", choices=backends, default=None,
                   help="backend of the draft model (default: --backend)")
    g.add_argument("--draft-variant", choices=variants, default="fp32",
                   help="ONNX variant of an ort draft model (default fp32); int8 / int4 read "
                        "fewer bytes per guess, and a draft's precision never changes the output")
    g.add_argument("--draft-tokens", type=positive_int, default=4,
                   help="drafts verified per step, at most (default 4; a draft model stops "
                        "early where it is unsure)")
    g.add_argument("--draft-vocab", type=Path, default=None, metavar="DATA_FOLDER",
                   help="an ort draft guesses only the most frequent tokens of this prepared "
                        "data folder's train split (e.g. the one the models trained on): its "
                        "lm_head shrinks to them; the output never changes")
    g.add_argument("--draft-vocab-size", type=positive_int, default=DEFAULT_SIZE,
                   help=f"tokens --draft-vocab keeps, at most (default {DEFAULT_SIZE})")


def read_prompts(args) -> list[str]:
    if args.prompt_file is not None:
        try:
            data = args.prompt_file.read_bytes()
        except OSError as e:
            raise SlmError(f"cannot read prompt file {args.prompt_file}: {e.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SlmError(f"{args.prompt_file} is not valid UTF-8 "
                           f"(byte {e.start}: {data[e.start:e.start + 1]!r})") from None
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise SlmError(f"{args.prompt_file} holds no prompts (every line is blank)")
        return prompts
    prompt = "Once upon a time" if args.prompt is None else args.prompt
    if not prompt:
        raise SlmError("the prompt is empty")
    if not prompt.strip():
        raise SlmError("the prompt is only whitespace")
    return [prompt]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prompts = read_prompts(args)
    check_speculative_flags(args)  # before the model loads
    if len(args.stop) > 4:
        raise SlmError(f"--stop is given {len(args.stop)} times: 4 at most")

    from slm_export.runtime import SamplingConfig, TokenStream, make_generator
    from slm_export.tokenizer import encode

    sampling = SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
        min_p=args.min_p, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
        logit_bias=tuple(args.logit_bias))
    backend = _load(args)
    rows = [p for p in prompts for _ in range(args.num_samples)]
    stream = TokenStream(backend, [encode(p) for p in rows], max_new_tokens=args.max_new_tokens,
                         sampling=sampling, generator=make_generator(args.seed, backend.device),
                         overflow=args.overflow, drafter=_drafter(args, backend),
                         draft_tokens=args.draft_tokens)
    live = sys.stdout.isatty() if args.stream is None else args.stream
    write_rows(stream, rows, sys.stdout, live, args.stop)
    return 0


def _load(args):
    """The backend on the requested device. With --device auto, a CUDA machine whose ONNX
    Runtime cannot use the GPU, or whose AOTInductor package was compiled for the CPU, falls
    back to the CPU with a one-line warning; an explicit --device cuda makes that an error."""
    from slm_export.artifacts.loaders import CudaProviderError, WrongDeviceError
    from slm_export.devices import resolve_device
    from slm_export.runtime import load_backend

    model = args.model or DEFAULT_MODEL
    device = resolve_device(args.device)
    try:
        return load_backend(args.backend, model, device, args.variant)
    except (CudaProviderError, WrongDeviceError) as e:
        if args.device != "auto":
            raise
        print(f"warning: {e}; running on the CPU", file=sys.stderr)
        return load_backend(args.backend, model, "cpu", args.variant)


def check_speculative_flags(args) -> None:
    """The speculative flags agree with each other (SlmError otherwise)."""
    for flag, value, mode in (("--draft-model", args.draft_model, "draft"),
                              ("--draft-vocab", args.draft_vocab, "draft"),
                              ("--ngram-data", args.ngram_data, "ngram")):
        if value is not None and args.speculative != mode:
            raise SlmError(f"{flag} needs --speculative {mode}")
    if args.speculative == "draft" and args.draft_model is None:
        raise SlmError("--speculative draft needs --draft-model CHECKPOINT_OR_EXPORT")
    name = args.draft_backend or args.backend
    if args.speculative == "draft" and args.draft_variant != "fp32" and name != "ort":
        raise SlmError(f"--draft-variant {args.draft_variant} needs an ort draft "
                       f"(--draft-backend ort), not {name}")


def _drafter(args, backend):
    """The drafter --speculative asks for (None without it; flags already checked)."""
    from slm_export.runtime.speculative import ModelDrafter, NgramDrafter, load_draft

    if args.speculative is None:
        return None
    if args.speculative == "ngram":
        from slm_export.runtime.ngram_table import NgramTable

        return NgramDrafter(table=None if args.ngram_data is None else NgramTable.from_data(args.ngram_data))
    name = args.draft_backend or args.backend
    vocab = None
    if args.draft_vocab is not None:
        from slm_export.runtime.draft_vocab import frequent_tokens

        vocab = frequent_tokens(args.draft_vocab, args.draft_vocab_size)
    return ModelDrafter(load_draft(name, args.draft_model, backend, args.draft_variant, vocab))


def write_rows(stream, texts: list[str], out, live: bool, stops=()) -> None:
    """Print each row's prompt and continuation, rows apart by ``SEPARATOR``; a row ends
    before the first of ``stops`` (``runtime.text.StopStrings``).

    Every row comes from the one batched stream, so a seed gives the same text streamed or
    not. ``live`` prints one row at a time token by token as it forms; the later rows are
    held back until the rows before them are complete, then printed up to where the batch
    has got and continued live.
    """
    from slm_export.runtime.text import StopStrings, TextDecoder

    decoders = [TextDecoder() for _ in texts]
    cut = [StopStrings(stops) for _ in texts]
    held = [[text] for text in texts]  # pieces not printed yet, per row
    current = 0  # the row printed live
    for step in stream:
        for b, tokens in step.items():
            for token in tokens:
                piece, stopped = cut[b].push(decoders[b].push(token))
                held[b].append(piece)
                if stopped:
                    stream.finish(b, "stop")
                    break
        while live:
            out.write("".join(held[current]))
            out.flush()
            held[current] = []
            if current in stream.live or current == len(texts) - 1:
                break
            out.write(_tail(decoders[current], cut[current]) + f"\n{SEPARATOR}\n")
            current += 1
    rest = ["".join(held[b]) + _tail(decoders[b], cut[b]) for b in range(current, len(texts))]
    out.write(f"\n{SEPARATOR}\n".join(rest) + "\n")
    out.flush()


def _tail(decoder, cut) -> str:
    """What a finished row still holds: an incomplete character, a possible stop's start."""
    piece, _ = cut.push(decoder.flush())
    return piece + cut.flush()


main = entry_point(main)
