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


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


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


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def device(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (whether that device exists is checked at run time)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def unit_interval(text: str) -> float:
    """A value in [0, 1] (a share that may be all or nothing)."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def probability(text: str) -> float:
    """A value in (0, 1] (--top-p)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def penalty(text: str) -> float:
    """--presence-penalty / --frequency-penalty: in [-2, 2], as OpenAI's API takes them."""
    value = float(text)
    if not -2 <= value <= 2:
        raise argparse.ArgumentTypeError(f"must be in [-2, 2], got {text}")
    return value


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
