"""What every command line front end shares: one-line errors and exit code 2."""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys

from slm_export.errors import SlmError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit code 2, as argparse)."""

    def error(self, message: str):
        message = message.replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever was typed
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(name: str, cast, ok, rule: str):
    """An argparse type: the text as ``cast`` (int or float) that ``ok`` accepts, else the one-line
    error "must be RULE, got TEXT" (a text ``cast`` rejects gets argparse's "invalid NAME value")."""

    def parse(text: str):
        value = cast(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = parse.__qualname__ = name
    return parse


positive_int = _number("positive_int", int, lambda v: v > 0, "a positive integer")
non_negative_int = _number("non_negative_int", int, lambda v: v >= 0, ">= 0")
seed = _number("seed", int, lambda v: 0 <= v < 2**63, "in [0, 2**63)")
port = _number("port", int, lambda v: 0 <= v <= 65535, "0..65535")
positive_float = _number("positive_float", float, lambda v: v > 0, "> 0")
non_negative_float = _number("non_negative_float", float, lambda v: v >= 0, ">= 0")
fraction = _number("fraction", float, lambda v: 0 < v < 1, "between 0 and 1")
unit_interval = _number("unit_interval", float, lambda v: 0 <= v <= 1, "in [0, 1]")  # a share
probability = _number("probability", float, lambda v: 0 < v <= 1, "in (0, 1]")  # --top-p
penalty = _number("penalty", float, lambda v: -2 <= v <= 2, "in [-2, 2]")  # as OpenAI's API takes them


def entry_point(main):
    """Wrap a CLI main(argv) so SlmError becomes one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv=None) -> int:
        try:
            return main(argv) or 0
        except SlmError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # e.g. `generate.py ... | head -1`: the reader left, not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except OSError as e:  # a full disk, a read-only folder, ... outside the checked paths
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror or e}", file=sys.stderr)
            return 2

    return wrapper


def device(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (whether that device exists is checked at run time)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def add_runtime_args(p: argparse.ArgumentParser, default_backend: str) -> None:
    """--backend, --variant and --device, as every command that runs a model takes them."""
    from slm_export.registry import BACKENDS, NAMES, VARIANTS

    from_checkpoint = "/".join(s.name for s in BACKENDS.values() if s.from_checkpoint)
    from_export = "/".join(s.name for s in BACKENDS.values() if not s.from_checkpoint)
    reduced = "; ".join(f"{s.name}: {', '.join(s.variants)}" for s in BACKENDS.values()
                        if len(s.variants) > 1)
    p.add_argument("--backend", choices=NAMES, default=default_backend,
                   help=f"{from_checkpoint} run a checkpoint; {from_export} an export folder "
                        f"(default {default_backend})")
    p.add_argument("--variant", choices=VARIANTS, default="fp32",
                   help=f"the file's variant, as export.py --quantize / --dtype wrote it ({reduced}; "
                        "every other backend fp32; default fp32)")
    p.add_argument("--device", type=device, default="auto",
                   help="auto, cpu, cuda or cuda:N (default auto: cuda when available and usable "
                        "by the backend, else cpu)")


def logit_bias(text: str) -> tuple[int, float]:
    """--logit-bias ID=BIAS: a token id and a bias in [-100, 100]."""
    token, sep, bias = text.partition("=")
    try:
        pair = int(token), float(bias)
    except ValueError:
        pair = None
    if not sep or pair is None:
        raise argparse.ArgumentTypeError(f"must be TOKEN_ID=BIAS, got {text!r}")
    from slm_export.tokenizer import get_encoding

    if not 0 <= pair[0] < get_encoding().n_vocab or not -100 <= pair[1] <= 100:
        raise argparse.ArgumentTypeError(f"needs a token id of the vocabulary and a bias in "
                                         f"[-100, 100], got {text!r}")
    return pair
