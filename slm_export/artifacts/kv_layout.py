"""The cache-graph signatures: the functional one ONNX and TorchScript share, and the
static-cache one of the AOTInductor package (at the end of this file).

The layout optimum, onnxruntime-genai and transformers.js use for decoder-only models, so
other tools open our ONNX cache graph (``onnx/model.onnx``) unchanged:

- inputs: ``input_ids`` [batch, sequence] int64; ``attention_mask`` [batch, past_sequence +
  sequence] int64 (0 = left padding); ``position_ids`` [batch, sequence] int64;
  ``past_key_values.{i}.key`` / ``.value`` [batch, n_head, past_sequence, head_dim] per layer
  (past_sequence may be 0); ``logits_to_keep`` [] int64: logits of the last K positions only,
  0 for all (optional in ONNX, where it defaults to 0, so tools that do not know it get
  every position; our runtime asks for what it samples from).
- outputs: ``logits`` [batch, K, vocab]; ``present.{i}.key`` / ``.value`` [batch, n_head,
  past_sequence + sequence, head_dim].

TorchScript takes the same inputs positionally (past as one tuple) and returns
``(logits, *present)``. The names below are what C++ callers and other tools rely on.
"""

from __future__ import annotations

TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS_TO_KEEP = "logits_to_keep"
# Per-layer names, %d = the layer (the form onnxruntime-genai's genai_config.json takes).
PAST = ("past_key_values.%d.key", "past_key_values.%d.value")
PRESENT = ("present.%d.key", "present.%d.value")


def past_names(n_layer: int) -> list[str]:
    return [name % i for i in range(n_layer) for name in PAST]


def present_names(n_layer: int) -> list[str]:
    return [name % i for i in range(n_layer) for name in PRESENT]


def input_names(n_layer: int) -> list[str]:
    return [*TOKEN_INPUTS, *past_names(n_layer), LOGITS_TO_KEEP]


def output_names(n_layer: int) -> list[str]:
    return ["logits", *present_names(n_layer)]



# -- the static-cache graph (AOTInductor's model_kv.pt2) ---------------------------------------
# A preallocated window the caller owns, written in place: no dimension is ever empty (an
# empty past is what torch.export would specialise on), and a decode step copies nothing.
#
# - inputs, positional: ``input_ids`` [batch, sequence] int64 (sequence >= 1);
#   ``attention_mask`` [batch, block_size] int64 (0 = left padding, ones past the prompt);
#   ``input_pos`` [sequence] int64: the window slots the new tokens take (start, start+1, ...);
#   ``logits_index`` [kept] int64: which of the new positions to return logits for
#   ([sequence - 1] for the next token, 0..sequence-1 to score them all);
#   ``cache.{i}.key`` / ``.value`` [batch, n_head, block_size, head_dim] per layer, float:
#   the keys and values at ``input_pos`` are written into these tensors.
# - output: ``logits`` [batch, kept, vocab].
# Slots past the current length hold stale values that the causal mask hides until a later
# call overwrites them, so a re-prefill from slot 0 (or a rewind) needs no reset.

STATIC_TOKEN_INPUTS = ("input_ids", "attention_mask", "input_pos", "logits_index")


def cache_names(n_layer: int) -> list[str]:
    return [f"cache.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def static_input_names(n_layer: int) -> list[str]:
    return [*STATIC_TOKEN_INPUTS, *cache_names(n_layer)]
