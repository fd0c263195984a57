"""OpenAI's completions API as this server reads it: a request body checked field by field,
and the error body every failure answers with (``{"error": {"message", "type", "param",
"code"}}``), each naming the problem.

Defaults are the API's (temperature 1, top_p 1, max_tokens 16, n 1), not generate.py's.
Extensions, as vLLM and llama.cpp's server take them: ``top_k``, ``min_p``,
``repetition_penalty``. Not served: ``logprobs``, ``suffix``, ``best_of`` other than ``n``
(an error says so rather than ignoring them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from slm_export.runtime import SamplingConfig
from slm_export.tokenizer import encode


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class Limits:
    max_tokens: int  # the most max_tokens a request may ask for
    max_rows: int  # prompts x n, at most (the batch)
    vocab_size: int
    model: str  # the name requests must use (or leave out)


@dataclass(frozen=True)
class Completion:
    prompts: list[list[int]]  # one per choice: each prompt n times, in OpenAI's choice order
    prompt_texts: list[str | None]
    max_tokens: int
    sampling: SamplingConfig
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    echo: bool


def _number(body, name, default, lo=-math.inf, hi=math.inf, lo_open=False, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, "
                       f"got {value!r}", name, "invalid_type")
    if value < lo or value > hi or (lo_open and value == lo):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise ApiError(400, f"'{name}' must be {low} and <= {hi}, got {value}", name, "invalid_value")
    return value


def _prompts(body, vocab_size: int) -> tuple[list[list[int]], list[str | None]]:
    """'prompt': a string, a list of strings, a list of token ids, or a list of such lists."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", "prompt", "missing")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "'prompt' must be a string, a list of strings or a list of token id "
                       "lists, and not empty", "prompt", "invalid_type")
    ids, texts = [], []
    for item in prompt:
        if isinstance(item, str):
            if not item:
                raise ApiError(400, "'prompt' is empty", "prompt", "invalid_value")
            ids.append(encode(item))
            texts.append(item)
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool)
                                                      for t in item):
            if any(not 0 <= t < vocab_size for t in item):
                raise ApiError(400, f"'prompt' has a token id outside [0, {vocab_size})", "prompt",
                               "invalid_value")
            ids.append(list(item))
            texts.append(None)
        else:
            raise ApiError(400, f"'prompt' items must be non-empty strings or token id lists, got "
                           f"{str(item)[:40]!r}", "prompt", "invalid_type")
    return ids, texts


def _stop(body) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > 4:
        raise ApiError(400, f"'stop' takes up to 4 strings, got {len(stops)}", "stop", "invalid_value")
    return [s for s in stops if s]


def _logit_bias(body, vocab_size: int) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise ApiError(400, "'logit_bias' must map token ids to numbers", "logit_bias", "invalid_type")
    out = []
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ApiError(400, f"'logit_bias' key {key!r} is not a token id", "logit_bias",
                           "invalid_value") from None
        if not 0 <= token < vocab_size:
            raise ApiError(400, f"'logit_bias' token {token} is outside [0, {vocab_size})",
                           "logit_bias", "invalid_value")
        out.append((token, _number({"v": value}, "v", 0.0, -100, 100)))
    return tuple(out)


def _sampling(body, vocab_size: int) -> SamplingConfig:
    temperature = _number(body, "temperature", 1.0, 0, 2)
    top_k = _number(body, "top_k", None, -1, vocab_size, integer=True)
    if top_k == 0:
        raise ApiError(400, "'top_k' must be >= 1 (or -1 for none)", "top_k", "invalid_value")
    return SamplingConfig(
        temperature=float(temperature), top_k=None if top_k in (None, -1) else top_k,
        top_p=float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
        min_p=float(_number(body, "min_p", 0.0, 0, 1)) or None,
        presence_penalty=float(_number(body, "presence_penalty", 0.0, -2, 2)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2, 2)),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0, 10, lo_open=True)),
        logit_bias=_logit_bias(body, vocab_size))


def _unsupported(body) -> None:
    if body.get("logprobs") is not None:
        raise ApiError(400, "'logprobs' is not supported by this server", "logprobs", "unsupported")
    if body.get("suffix") is not None:
        raise ApiError(400, "'suffix' is not supported by this server", "suffix", "unsupported")
    best_of, n = body.get("best_of"), body.get("n", 1)
    if best_of is not None and best_of != n:
        raise ApiError(400, "'best_of' other than n is not supported by this server", "best_of",
                       "unsupported")


def _flag(body, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {value!r}", name, "invalid_type")
    return value


def parse_completion(body: Any, limits: Limits) -> Completion:
    """A ``/v1/completions`` body -> ``Completion``; ``ApiError`` (400) naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_body")
    model = body.get("model")
    if model is not None and model != limits.model:
        raise ApiError(400, f"model {model!r} is not served here; GET /v1/models lists "
                       f"{limits.model!r}", "model", "model_not_found")
    _unsupported(body)
    ids, texts = _prompts(body, limits.vocab_size)
    n = _number(body, "n", 1, 1, limits.max_rows, integer=True)
    if len(ids) * n > limits.max_rows:
        raise ApiError(400, f"{len(ids)} prompt(s) x n = {n} is {len(ids) * n} rows; this "
                       f"server batches at most {limits.max_rows} (--max-batch)", "n", "invalid_value")
    seed = _number(body, "seed", None, 0, 2**63 - 1, integer=True)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    return Completion(
        prompts=[p for p in ids for _ in range(n)], prompt_texts=[t for t in texts for _ in range(n)],
        max_tokens=_number(body, "max_tokens", 16, 1, limits.max_tokens, integer=True),
        sampling=_sampling(body, limits.vocab_size), seed=seed, stop=_stop(body),
        stream=_flag(body, "stream"), include_usage=_flag(options, "include_usage"),
        echo=_flag(body, "echo"))
