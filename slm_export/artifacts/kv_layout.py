"""The cache-graph signature every exported KV file shares (ONNX and TorchScript).

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
``(logits, *present)``.
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

