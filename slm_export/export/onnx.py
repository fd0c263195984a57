"""ONNX export: ``model.onnx`` (all-position logits), ``onnx/model.onnx`` (the cache graph,
beside the files optimum and onnxruntime-genai read: ``export/onnx_folder.py``), and the
reduced variants of both (``model.<variant>.onnx``: fp16, int8, int4).

Exporter: the dynamo one (``torch.onnx.export(..., dynamo=True)``, via torch.export and
onnxscript), not the legacy TorchScript-based one. Why:
- dynamic shapes are solved symbolically, so one graph serves every batch, sequence and
  past length, including an empty past (P = 0), which a trace taken at P > 0 may not
  (legacy traces can bake in shapes through Python ints, silently);
- the tied embedding / lm_head matrix stays one initializer (Gather + Gemm(transB) on the
  same tensor), where the legacy exporter's constant folding can add a transposed copy;
- it is the exporter torch maintains (the legacy one is deprecated) and works from torch
  2.6 (with onnxscript) to today.
torch.export cannot express ``total_sequence = past_sequence + sequence`` with named Dims,
so every axis is exported as ``Dim.DYNAMIC`` and its symbol renamed afterwards to the
contract's names (batch, sequence, past_sequence, total_sequence). The cache graph follows
``artifacts/kv_layout.py``; its ``logits_to_keep`` input gets an initializer of 0 beside it,
which makes it optional (ONNX Runtime lists it among the overridable initializers, not the
inputs), so tools that do not know it get logits for every position.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from slm_export.artifacts import kv_layout
from slm_export.artifacts.files import atomic_write
from slm_export.artifacts.manifest import Provenance
from slm_export.errors import SlmError, first_line
from slm_export.export import attention_op, onnx_folder
from slm_export.export.signatures import KVModule, LogitsModule, kv_inputs, logits_inputs

DEFAULT_OPSET = 18  # LayerNormalization needs 17; 18 is the dynamo exporter's floor
MIN_OPSET = 18
GRAPHS = {"onnx": "model.onnx", "onnx_kv": f"{onnx_folder.FOLDER}/{onnx_folder.CACHE_GRAPH}"}

LOGITS_IO = {
    "inputs": {"input_ids": {0: "batch", 1: "sequence"}},
    "outputs": {"logits": {0: "batch", 1: "sequence"}},
}


def kv_io(n_layer: int) -> dict:
    """Names and dynamic axes of the cache graph (``artifacts/kv_layout.py``)."""
    past = {name: {0: "batch", 2: "past_sequence"} for name in kv_layout.past_names(n_layer)}
    present = {name: {0: "batch", 2: "total_sequence"}
               for name in kv_layout.present_names(n_layer)}
    return {
        "inputs": {"input_ids": {0: "batch", 1: "sequence"},
                   "attention_mask": {0: "batch", 1: "total_sequence"},
                   "position_ids": {0: "batch", 1: "sequence"},
                   **past, kv_layout.LOGITS_TO_KEEP: {}},
        "outputs": {"logits": {0: "batch", 1: "kept_sequence"}, **present},
    }


def max_opset() -> int:
    return onnx.defs.onnx_opset_version()


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= max_opset():
        raise SlmError(f"--opset {opset} is not supported: choose {MIN_OPSET}..{max_opset()} "
                       f"(default {DEFAULT_OPSET})")


@contextlib.contextmanager
def _quiet_exporter():
    # The exporter logs one warning per missing torchvision op; they are irrelevant here.
    # torch's own pytree code warns about its internal LeafSpec use (torch 2.13): not ours.
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        log.setLevel(level)


def _dynamic(axes: dict) -> dict:
    return {axis: torch.export.Dim.DYNAMIC for axis in axes}


def _export(module: torch.nn.Module, args: tuple, io: dict, dynamic, opset: int,
            translations: dict | None = None) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) of ``module`` on ``args``; ``dynamic`` is torch.export's
    dynamic_shapes (structured like the forward's arguments), ``io`` the flat names."""
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, verbose=False,
                input_names=list(io["inputs"]), output_names=list(io["outputs"]),
                dynamic_shapes=dynamic, custom_translation_table=translations,
            )
    except Exception as e:  # the exporter raises many types; keep the first line
        raise SlmError(f"ONNX export failed ({type(e).__name__}: {first_line(e)})") from None
    proto = program.model_proto
    _name_axes(proto, io)
    return proto


def _name_axes(proto: onnx.ModelProto, io: dict) -> None:
    """Rename the exporter's shape symbols (s0, s1 + s2, ...) to the contract's axis names."""
    rename: dict[str, str] = {}
    for spec, values in ((io["inputs"], proto.graph.input), (io["outputs"], proto.graph.output)):
        for value in values:
            dims = value.type.tensor_type.shape.dim
            for axis, name in spec.get(value.name, {}).items():
                if not dims[axis].dim_param:
                    raise SlmError(f"ONNX export made axis {axis} of {value.name} static "
                                   f"({dims[axis].dim_value}); expected dynamic {name!r}")
                rename.setdefault(dims[axis].dim_param, name)
                dims[axis].dim_param = name
    for value in proto.graph.value_info:  # keep intermediate shapes consistent with the io
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def _default_logits_to_keep(proto: onnx.ModelProto) -> None:
    """An initializer of 0 under the input's name: the input becomes optional (all positions)."""
    from onnx import numpy_helper

    default = numpy_helper.from_array(np.array(0, dtype=np.int64), kv_layout.LOGITS_TO_KEEP)
    proto.graph.initializer.append(default)


def save(proto: onnx.ModelProto, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Embed ``metadata`` and write atomically, weights inline (our models are far < 2 GB)."""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))


def export(model: torch.nn.Module, provenance: Provenance, folder: str | os.PathLike,
           opset: int = DEFAULT_OPSET) -> dict[str, str]:
    """Write the fp32 graphs (``GRAPHS``) and the onnx/ folder's config and tokenizer files
    into ``folder``; -> {file name: kind}."""
    check_opset(opset)
    folder = Path(folder)
    full = _export(LogitsModule(model), logits_inputs(model.config), LOGITS_IO,
                   {"input_ids": _dynamic(LOGITS_IO["inputs"]["input_ids"])}, opset)
    save(full, folder / GRAPHS["onnx"], provenance.file_metadata("onnx"))
    io = kv_io(model.config.n_layer)
    axes = io["inputs"]
    dynamic = {name: _dynamic(axes[name]) for name in kv_layout.TOKEN_INPUTS}
    dynamic["past_key_values"] = tuple(_dynamic(axes[name])
                                       for name in kv_layout.past_names(model.config.n_layer))
    dynamic["logits_to_keep"] = None
    kv = _export(KVModule(model, fused_attention=True), kv_inputs(model.config), io, dynamic,
                 opset, attention_op.TRANSLATIONS)
    _default_logits_to_keep(kv)
    save(kv, folder / GRAPHS["onnx_kv"], provenance.file_metadata("onnx_kv"))
    return {**{name: kind for kind, name in GRAPHS.items()},
            **onnx_folder.write(model.config, folder)}


def _rewrite(src: Path, dst: Path, provenance: Provenance, kind: str, variant: str,
             convert) -> None:
    """Write ``convert(src, tmp)``'s result to ``dst`` with fresh metadata, atomically."""
    tmp = dst.with_name(f".{dst.name}.convert{os.getpid()}")
    try:
        convert(src, tmp)
        proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    save(proto, dst, provenance.file_metadata(kind, variant))


def _prepare_for_quantization(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold Transpose(initializer) into the initializer, and give every consumer of a shared
    initializer its own copy.

    - The exporter writes ``x @ W.T`` as MatMul(x, Transpose(W)), which hides W from
      ``quantize_dynamic`` (it only quantizes MatMuls whose B is a constant).
    - The tied embedding feeds both Gather and the lm_head MatMul/Gemm. The quantizer names
      a quantized weight after its source, so a shared source would be quantized once in one
      layout and silently reused by the other consumer (wrong tokens from the embedding).
    Untying costs one extra int8 copy of the matrix. Stale intermediate shapes are dropped
    (the quantizer re-infers them and rejects any that disagree).
    """
    from onnx import numpy_helper

    inputs = {value.name for value in model.graph.input}  # optional inputs stay as they are
    inits = {init.name: init for init in model.graph.initializer if init.name not in inputs}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            weight = numpy_helper.to_array(inits[node.input[0]]).transpose(perm)
            folded = numpy_helper.from_array(weight.copy(order="C"), node.output[0])
            model.graph.initializer.append(folded)
            inits[folded.name] = folded
        else:
            nodes.append(node)
    seen: set[str] = set()
    for node in nodes:
        for i, name in enumerate(node.input):
            if name not in inits:
                continue
            if name in seen:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}.{node.name or len(seen)}"
                model.graph.initializer.append(copy)
                node.input[i] = copy.name
            seen.add(name)
    used = {name for node in nodes for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    return model


def _int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Weights of MatMul and Gather (the embedding) to int8 (per tensor, symmetric);
    # activations are quantized on the fly at run time. The op types are named: the
    # quantizer's default list has "Attention", which it takes for ORT's contrib op of that
    # name (QAttention) and would break an opset >= 23 graph's ONNX Attention nodes.
    folded = dst.with_name(dst.name + ".folded")
    try:
        onnx.save(_prepare_for_quantization(onnx.load(str(src))), str(folded))
        with _quiet_quantizer():
            quantize_dynamic(str(folded), str(dst), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gather"],
                             # onnx's shape inference stops at the contrib attention op
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        folded.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_quantizer():
    # quantize_dynamic logs "consider pre-processing" (image-model advice) on the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # Weights, math and the KV cache in fp16 (with fp32 past/present every step would cast
    # the whole cache both ways); the logits stay fp32 for sampling. LayerNorm is
    # safe as is: ONNX LayerNormalization computes its statistics in fp32 (stash_type=1), and
    # ORT's fp16 Softmax accumulates in fp32. (Blocking them with op_block_list makes the
    # converter emit duplicate casts for shared weights, an invalid graph.)
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=["logits"])
    wrapped = OnnxModel(model)
    wrapped.topological_sort()  # the converter appends its input casts after their users
    onnx.save(wrapped.model, str(dst))


def _int4(src: Path, dst: Path) -> None:
    """Weight-only 4-bit: every MatMul with a constant weight (the tied lm_head too, ~64% of
    the 30m model's weight bytes) becomes MatMulNBits, and the embedding lookups
    GatherBlockQuantized, with symmetric blocks of 32 and one fp32 scale per block;
    activations stay fp32 (the CPU kernel may compute in int8: accuracy_level 4), LayerNorm
    and biases stay fp32."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = _prepare_for_quantization(onnx.load(str(src)))
    with _quiet_quantizer():
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK, is_symmetric=True,
                                         accuracy_level=4, op_types_to_quantize=("MatMul", "Gather"))
        quantizer.process()
    onnx.save(quantizer.model.model, str(dst))


def _mixed(src: Path, dst: Path) -> None:
    """4-bit blocks for the transformer's matmuls (as ``int4``), and one 8-bit copy of the tied
    embedding / lm_head matrix, most of the weight bytes and the one whose 4-bit rounding moves
    the top-1 choice most: the lm_head a MatMulNBits of 8 bits, the embedding lookup a
    GatherBlockQuantized reading the same 8-bit blocks (ORT's quantizer would untie them)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = _prepare_for_quantization(onnx.load(str(src)))
    vocab = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    big = {i.name for i in model.graph.initializer if vocab in i.dims}
    tied = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gather") and set(n.input) & big]
    head = [n for n in model.graph.node if n.op_type == "MatMul" and n.name in tied]
    if len(head) != 1:
        raise SlmError(f"mixed: expected one lm_head matmul over the vocabulary, found {len(head)}")
    with _quiet_quantizer():
        blocks = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK, is_symmetric=True,
                                      accuracy_level=4, op_types_to_quantize=("MatMul", "Gather"),
                                      nodes_to_exclude=tied)
        blocks.process()
        vocab_matrix = MatMulNBitsQuantizer(blocks.model.model, bits=8, block_size=VOCAB_BLOCK,
                                            is_symmetric=True, accuracy_level=4,
                                            op_types_to_quantize=("MatMul",), nodes_to_include=[head[0].name])
        vocab_matrix.process()
    model = vocab_matrix.model.model
    _embed_from_head(model, vocab)
    onnx.save(model, str(dst))


def _embed_from_head(model: onnx.ModelProto, vocab: int) -> None:
    """Every Gather of an fp32 vocabulary matrix becomes a GatherBlockQuantized of the 8-bit
    lm_head's blocks (its B [V, blocks, VOCAB_BLOCK] and a [V, blocks, 1] view of its scales), then a
    Reshape back to [..., C]; the fp32 matrices it read leave the graph."""
    from onnx import helper, numpy_helper

    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits"
                and next(a.i for a in n.attribute if a.name == "bits") == 8)
    inits = {i.name: i for i in model.graph.initializer}
    weight, scales = inits[head.input[1]], inits[head.input[2]]
    blocks = weight.dims[1]
    scales3 = numpy_helper.from_array(numpy_helper.to_array(scales).reshape(vocab, blocks, 1),
                                      scales.name + ".per_row")
    model.graph.initializer.append(scales3)
    shape = numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), "embedding.shape")
    model.graph.initializer.append(shape)
    nodes = []
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or vocab not in table.dims:
            nodes.append(node)
            continue
        gathered = node.output[0] + ".blocks"
        nodes.append(helper.make_node("GatherBlockQuantized", [weight.name, node.input[1], scales3.name],
                                      [gathered], name=node.name + "_Q8", domain="com.microsoft", bits=8,
                                      block_size=VOCAB_BLOCK, gather_axis=0, quantize_axis=2))
        nodes.append(helper.make_node("Reshape", [gathered, shape.name], [node.output[0]],
                                      name=node.name + "_shape"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


INT4_BLOCK = 32
# mixed's 8-bit vocabulary matrix: blocks of 128 (a third of 384 dims) keep its scales at 1/32
# of its bytes; 8 bits need fewer scales than 4 to keep the top-1 choice.
VOCAB_BLOCK = 128
CONVERTERS = {"int8": _int8, "int4": _int4, "mixed": _mixed, "fp16": _fp16}  # variant -> its writer


def variant_name(name: str, variant: str) -> str:
    """model.onnx -> model.int8.onnx (in the same folder)."""
    return name.removesuffix(".onnx") + f".{variant}.onnx"


def export_variant(folder: str | os.PathLike, provenance: Provenance,
                   variant: str) -> dict[str, str]:
    """From the fp32 graphs in ``folder``, write their <variant> variants beside them."""
    folder = Path(folder)
    written = {}
    for kind, name in GRAPHS.items():
        target = variant_name(name, variant)
        _rewrite(folder / name, folder / target, provenance, kind, variant, CONVERTERS[variant])
        written[target] = kind
    return written

