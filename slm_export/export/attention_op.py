"""The cache graph's attention as one ONNX node: ONNX Runtime's ``MultiHeadAttention``.

Exported op by op, one layer's attention in the cache graph is a Split, three Reshape /
Transpose pairs, two Concat (past + new), the mask arithmetic, two MatMul, Softmax and the
transpose back: about 20 nodes, each a kernel launch and an allocation per decode step. At
batch 1 on the CPU that per-node cost, not the arithmetic, is most of a step once the
weights are small (int8 / int4). ``com.microsoft.MultiHeadAttention`` (CPU and CUDA
kernels; causal on CUDA since ONNX Runtime 1.20, hence our floor) does it in one node:
query / key / value as (B, T, C) straight from the QKV projection, the past
(B, n_head, P, head_dim) in, the present (past + new) out, the padding mask (B, P + T) as
``key_padding_mask`` and ``unidirectional=1`` for the causal part. onnxruntime-genai's model
builder and HF optimum's ORT optimizer emit this op family too.

How it gets into the graph: ``KVModule(model, fused_attention=True)`` gives each layer a
``FusedCache``, whose ``attend`` calls the custom op ``slm_export::cached_attention``. Its
eager implementation is the model's own (concat + the mask of ``model.mask_and_positions`` +
SDPA), so the module runs and traces like the unfused one; the ONNX exporter translates the
op with ``TRANSLATIONS``. Only the ONNX export uses it (TorchScript / AOTInductor files must
not depend on a custom op).

One difference, at padded positions only: where the model lets a left-padding query see
itself, ONNX Runtime adds ``mask_filter_value`` (-10000) to every masked score, so such a
query averages the keys before it. Its output and the cache entries it writes differ from
eager, but no real query ever reads them (they are masked as keys), so logits and tokens do
not change; the export's verification compares exactly those.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from slm_export.model import LayerCache, mask_and_positions, positions


@torch.library.custom_op("slm_export::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                     past_v: torch.Tensor, attention_mask: torch.Tensor,
                     n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, T, C) of T new positions after P cached ones (past (B, n_head, P, hs)),
    ``attention_mask`` (B, P + T) -> (y (B, T, C), present_k, present_v (B, n_head, P + T, hs))."""
    B, T, C = q.shape
    P = past_k.size(2)

    def heads(t):
        return t.view(B, T, n_head, C // n_head).transpose(1, 2)

    present_k = torch.cat([past_k, heads(k)], dim=2)
    present_v = torch.cat([past_v, heads(v)], dim=2)
    mask, _ = mask_and_positions(positions(q, P, T), P + T, attention_mask)
    y = F.scaled_dot_product_attention(heads(q), present_k, present_v, attn_mask=mask)
    return y.transpose(1, 2).reshape(B, T, C), present_k, present_v


@cached_attention.register_fake
def _(q, k, v, past_k, past_v, attention_mask, n_head):
    B, T, C = q.shape
    present = past_k.new_empty(B, n_head, past_k.size(2) + T, C // n_head)
    return q.new_empty(B, T, C), present, present.new_empty(present.shape)


class FusedCache(LayerCache):
    """One layer's past whose ``attend`` runs the whole attention as the custom op (the model's
    mask is not used: the op builds the same one from the padding mask); ``k`` / ``v`` are
    the present after."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor):
        self.k, self.v, self.attention_mask = k, v, attention_mask

    def attend(self, q, k, v, n_head: int, mask=None, dropout_p: float = 0.0) -> torch.Tensor:
        y, self.k, self.v = cached_attention(q, k, v, self.k, self.v, self.attention_mask, n_head)
        return y


def _multi_head_attention():
    """``com.microsoft.MultiHeadAttention`` as an onnxscript op (the inputs and attributes we
    use): onnx ships no schemas for ONNX Runtime's contrib ops, and the exporter's tracer
    needs one."""
    import onnxscript
    from onnx.defs import OpSchema

    def param(name, type_str="T", optional=False):
        option = OpSchema.FormalParameterOption
        return OpSchema.FormalParameter(
            name, type_str, param_option=option.Optional if optional else option.Single)

    schema = OpSchema(
        "MultiHeadAttention", "com.microsoft", 1,
        inputs=[param("query"), param("key"), param("value"), param("bias", optional=True),
                param("key_padding_mask", "M", optional=True),
                param("attention_bias", optional=True), param("past_key", optional=True),
                param("past_value", optional=True)],
        outputs=[param("output"), param("present_key", optional=True),
                 param("present_value", optional=True)],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""),
                          ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT),
                    OpSchema.Attribute("unidirectional", OpSchema.AttrType.INT, required=False)])
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), schema.name, schema)


def _onnx_cached_attention(q, k, v, past_k, past_v, attention_mask, n_head: int):
    import onnxscript
    from onnxscript import opset18 as op

    key_padding_mask = op.Cast(attention_mask, to=onnxscript.INT32.dtype)
    return _multi_head_attention()(q, k, v, None, key_padding_mask, None, past_k, past_v,
                                   num_heads=n_head, unidirectional=1)


TRANSLATIONS = {torch.ops.slm_export.cached_attention.default: _onnx_cached_attention}
