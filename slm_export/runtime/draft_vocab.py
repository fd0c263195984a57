"""A draft model's lm_head cut to the tokens its text uses (a frequency-ranked draft
vocabulary, as FR-Spec does for large vocabularies).

A small draft's cost per guess is mostly its lm_head: the tiny preset's (50257 x 128) is
most of its weights.
The stories the models learn use a few hundred distinct tokens, so the draft scores only
the most frequent tokens of a prepared data folder's train split: the ONNX graph's lm_head
weight keeps those rows, and the drafter maps its picks back to token ids. The target
still verifies every guess, so the output never changes; a token outside the list can only
be missed as a guess, never lost. (The drafter's confidence stop then reads probabilities
normalised over the list: a little higher than over the whole vocabulary.)

The cut graph is rewritten at load time, after the file's SHA-256 check, so it is checked
before it is served (``check_restricted``): its logits must be the full graph's at the kept
tokens, on a probe of the kept tokens themselves.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from slm_export.artifacts import kv_layout
from slm_export.data import TokenData
from slm_export.errors import SlmError
from slm_export.tokenizer import EOT_ID

DEFAULT_SIZE = 8192  # tokens kept at most: room for real text (the embedded stories use far fewer)


def frequent_tokens(data_folder: str | os.PathLike, size: int = DEFAULT_SIZE) -> torch.Tensor:
    """The ``size`` most frequent token ids of ``data_folder``'s train split, plus
    <|endoftext|>, in increasing id order (int64)."""
    if size < 1:
        raise SlmError(f"--draft-vocab-size must be at least 1, not {size}")
    counts = np.bincount(TokenData(data_folder).tokens("train"), minlength=EOT_ID + 1)
    ranked = np.argsort(-counts, kind="stable")[:size]
    keep = np.union1d(ranked[counts[ranked] > 0], [EOT_ID])
    return torch.from_numpy(keep.astype(np.int64))


def restrict_lm_head(model: onnx.ModelProto, ids: torch.Tensor, vocab_size: int) -> onnx.ModelProto:
    """``model`` (an exported cache graph, loaded with its weights) whose ``logits`` output
    covers only ``ids``: the lm_head's weight initializers keep those rows. Handles the
    graphs our export writes: fp32 / fp16 (MatMul, the weight through a Transpose), int8
    (MatMulInteger on the (n_embd, vocab) weight) and int4 (MatMulNBits, its scales too)."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    inits = {i.name: i for i in graph.initializer}
    head = _head_node(producers, inits)
    rows = ids.numpy()
    if head.op_type == "MatMulNBits":  # its own weight (N, blocks, bytes) and scales: cut them
        for name in head.input[1:]:
            if name in inits:
                inits[name].CopyFrom(numpy_helper.from_array(_rows(inits[name], rows, 0, vocab_size), name))
        for attr in head.attribute:
            if attr.name == "N":
                attr.i = len(rows)
    else:  # the weight may be the tied embedding's too: the head reads a cut copy
        reader, slot, weight = _weight_reader(head, producers, inits, vocab_size)
        cut = _rows(weight, rows, list(weight.dims).index(vocab_size), vocab_size)
        graph.initializer.append(numpy_helper.from_array(cut, weight.name + ".draft_rows"))
        reader.input[slot] = weight.name + ".draft_rows"
    for out in graph.output:
        if out.name == "logits":
            out.type.tensor_type.shape.dim[-1].dim_value = len(rows)
    return model


def _head_node(producers: dict, inits: dict) -> onnx.NodeProto:
    """The matmul node whose output becomes ``logits`` (through casts / scale multiplies)."""
    node = producers.get("logits")
    while node is not None:
        if node.op_type in ("MatMul", "MatMulInteger", "MatMulNBits", "Gemm"):
            return node
        data = [x for x in node.input if x in producers and x not in inits]
        node = producers[data[0]] if data else None
    raise SlmError("this ONNX graph has no lm_head matmul before its logits")


def _weight_reader(head, producers, inits, vocab_size) -> tuple[onnx.NodeProto, int, onnx.TensorProto]:
    """(the node reading the lm_head weight, which of its inputs, the weight): the head
    itself, or the Transpose feeding it."""
    for i, name in enumerate(head.input):
        if name in inits and vocab_size in inits[name].dims:
            return head, i, inits[name]
        node = producers.get(name)
        if node is not None and node.op_type == "Transpose" and node.input[0] in inits:
            return node, 0, inits[node.input[0]]
    raise SlmError("cannot find the lm_head weight of this ONNX graph")


def _rows(tensor: onnx.TensorProto, rows: np.ndarray, axis: int, vocab_size: int) -> np.ndarray:
    """``tensor``'s ``rows`` along ``axis`` (a flat tensor is ``vocab_size`` equal parts)."""
    array = numpy_helper.to_array(tensor)
    flat = array.ndim == 1
    cut = np.take(array.reshape(vocab_size, -1) if flat else array, rows, axis=axis)
    return np.ascontiguousarray(cut.reshape(-1) if flat else cut)


PROBE_TOKENS = 16
CUT_TOLERANCE = 1e-3  # x the std of the full graph's logits at the kept tokens


def check_restricted(full: onnx.ModelProto, cut: bytes, ids: torch.Tensor, config, path) -> None:
    """The cut graph's logits against the full graph's at ``ids``, on a prefill of up to
    PROBE_TOKENS of the kept tokens (CPU, one thread); ``SlmError`` where they differ."""
    from slm_export.artifacts.loaders import ort_session

    tokens = ids[:PROBE_TOKENS].view(1, -1).numpy()
    T, c = tokens.shape[1], config
    feeds = {"input_ids": tokens, "attention_mask": np.ones((1, T), np.int64),
             "position_ids": np.arange(T, dtype=np.int64)[None],
             **{name: np.zeros((1, c.n_head, 0, c.head_dim), _kv_type(full))
                for name in kv_layout.past_names(c.n_layer)}}
    want = ort_session(full.SerializeToString(), threads=1).run(["logits"], feeds)[0][..., ids.numpy()]
    have = ort_session(cut, threads=1).run(["logits"], feeds)[0]
    error = float(np.abs(have - want).max()) if have.shape == want.shape else float("inf")
    if not error <= CUT_TOLERANCE * float(want.std()):
        raise SlmError(f"{path}: its lm_head cut to the draft vocabulary changes the kept tokens' "
                       f"logits (max |diff| {error:.3g}); this graph's layout is not one "
                       "draft_vocab knows")


def _kv_type(model: onnx.ModelProto):
    """numpy dtype of the graph's past inputs (fp16 graphs keep an fp16 cache)."""
    past = next(v for v in model.graph.input if v.name == kv_layout.past_names(1)[0])
    return onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type)
