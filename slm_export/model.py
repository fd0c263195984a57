"""A nanoGPT-style GPT with two cache paths for fast decoding.

Three ways to run the same weights:
- ``forward(idx, targets=None)``: the training / full-recompute path (causal SDPA).
- ``forward_kv(idx, past)``: functional KV cache. ``past`` holds the keys and values of the
  previous positions, one (B, n_head, P, head_dim) tensor each per layer (``KV``: k_0, v_0,
  k_1, v_1, ..., P >= 0, the layout optimum and onnxruntime-genai use); it returns the
  logits of the last positions and the grown cache. Pure tensors in and out, so it traces
  and exports (TorchScript, ONNX) with dynamic batch, sequence and past lengths.
- ``forward_static(idx, input_pos, window, mask, logits_index)``: a preallocated window per
  layer, written in place at ``input_pos``; shapes never change, which is what
  ``torch.compile``, AOTInductor and CUDA graphs want.
All three share the blocks below; only where keys/values come from differs: each layer's
``LayerCache`` (one protocol, ``attend``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from slm_export.config import GPTConfig

KV = tuple[torch.Tensor, ...]  # (k_0, v_0, k_1, v_1, ...): 2 * n_layer tensors (B, nh, P, hs)


def _heads(t: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C = t.shape
    return t.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, nh, T, hs)


class LayerCache:
    """The one cache protocol of a layer: ``attend(q, k, v, n_head, mask, dropout_p)`` turns
    the new positions' projections (B, T, C) into the attention output (B, T, C).

    This base class is the no-cache case (the keys are the new positions); a cache that
    keeps keys overrides ``keys_values``, one that runs attention elsewhere (the ONNX
    export's fused op, ``export/attention_op.py``) overrides ``attend``."""

    def keys_values(self, k: torch.Tensor, v: torch.Tensor):
        """The new keys/values (B, nh, T, hs) -> every key/value attention reads (B, nh, S, hs)."""
        return k, v

    def attend(self, q, k, v, n_head: int, mask: torch.Tensor | None, dropout_p: float = 0.0):
        B, T, C = q.shape
        k, v = self.keys_values(_heads(k, n_head), _heads(v, n_head))
        q = _heads(q, n_head)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return y.transpose(1, 2).contiguous().view(B, T, C)


class GrowingCache(LayerCache):
    """Functional cache for one layer: the past keys/values with the new ones appended,
    which is both what attention reads and the layer's present (one copy per step)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (B, nh, P, hs)

    def keys_values(self, k, v):
        self.k = torch.cat([self.k, k], dim=2)  # (B, nh, P + T, hs)
        self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v


class StaticCache(LayerCache):
    """One layer's preallocated window (B, nh, block_size, hs), owned by the caller and written
    in place at ``input_pos`` (T,) (gpt-fast's KVCache): shapes never change."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor):
        self.k, self.v, self.input_pos = k, v, input_pos

    def keys_values(self, k, v):
        self.k.index_copy_(2, self.input_pos, k)
        self.v.index_copy_(2, self.input_pos, v)
        return self.k, self.v


_NO_CACHE = LayerCache()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                mask: torch.Tensor | None = None):
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        dropout_p = self.dropout if self.training else 0.0
        y = (cache or _NO_CACHE).attend(q, k, v, self.n_head, mask, dropout_p)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache=None, mask: torch.Tensor | None = None):
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameter count; the tied embedding / lm_head matrix is counted once."""
        return sum(p.numel() for p in self.parameters())

    def _hidden(self, idx: torch.Tensor, pos: torch.Tensor, caches=None, mask=None):
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if caches is None else caches[i], mask)
        return self.transformer.ln_f(x)  # (B, T, C)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm's output (B, T, C) for idx (B, T): what ``lm_head`` turns into
        logits (the chunked training loss and the full-sequence export start here)."""
        T = idx.size(1)
        if not torch.jit.is_tracing() and T > self.config.block_size:  # a trace keeps T symbolic
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        return self._hidden(idx, positions(idx, 0, T))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) -> (logits, loss).

        With targets: logits for every position (B, T, V) and the mean cross-entropy
        (targets of -1 are ignored). Without: the last position's logits (B, 1, V), loss None.
        """
        h = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(h[:, [-1], :]), None
        logits = self.lm_head(h)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    def empty_kv(self, batch: int) -> KV:
        """A cache with no past positions, on the weights' device and dtype."""
        ref = self.lm_head.weight
        return empty_kv(self.config, batch, ref.device, ref.dtype)

    def forward_kv(self, idx: torch.Tensor, past: KV, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, logits_to_keep=1, cache=None):
        """idx (B, T) after ``past`` (P positions) -> (logits (B, K, V), present (P + T positions)).

        ``attention_mask`` (B, P+T), 1 for real tokens and 0 for left padding, lets prompts
        of different lengths share a batch; positions then count real tokens only, unless
        ``position_ids`` (B, T) gives them. ``logits_to_keep`` K (an int or a 0-d tensor):
        logits of the last K positions only, 0 for all (the lm_head is the costliest matmul
        of a prefill). The caller keeps P + T <= block_size (positions are learned, a cache
        cannot slide). ``cache(k, v)`` makes a layer's ``LayerCache`` from its past
        (default ``GrowingCache``; the ONNX export's runs a fused attention op).
        """
        T, P = idx.size(1), past[0].size(2)
        q_pos = positions(idx, P, T)
        mask, pos = mask_and_positions(q_pos, P + T, attention_mask)
        if position_ids is not None:
            pos = position_ids
        new_cache = cache or GrowingCache
        caches = [new_cache(past[2 * i], past[2 * i + 1]) for i in range(self.config.n_layer)]
        h = self._hidden(idx, pos, caches, mask)
        present = tuple(t for c in caches for t in (c.k, c.v))
        return self.lm_head(h[:, -logits_to_keep:]), present

    def empty_window(self, batch: int) -> KV:
        """Preallocated windows for ``forward_static``: 2 * n_layer zero tensors (batch,
        n_head, block_size, head_dim) on the weights' device and dtype (zeros, not empty:
        masked slots are multiplied by a zero weight, and 0 * NaN would leak)."""
        c, ref = self.config, self.lm_head.weight
        return tuple(torch.zeros(batch, c.n_head, c.block_size, c.head_dim, device=ref.device,
                                 dtype=ref.dtype) for _ in range(2 * c.n_layer))

    def forward_static(self, idx: torch.Tensor, input_pos: torch.Tensor, window: KV,
                       attention_mask: torch.Tensor, logits_index: torch.Tensor) -> torch.Tensor:
        """idx (B, T) written at slots ``input_pos`` (T,) of the caller's preallocated
        ``window`` (``empty_window``: written in place) -> logits (B, K, V) of the new
        positions ``logits_index`` (K,) names (the last one to sample from, all of them to
        verify drafts: one graph serves both).

        ``attention_mask`` (B, block_size) marks real tokens (1) and left padding (0); slots
        past the current length hold stale values the causal mask hides.
        """
        mask, pos = mask_and_positions(input_pos, window[0].size(2), attention_mask)
        caches = [StaticCache(window[2 * i], window[2 * i + 1], input_pos)
                  for i in range(self.config.n_layer)]
        h = self._hidden(idx, pos, caches, mask)
        return self.lm_head(h.index_select(1, logits_index))


class BlockedHead(nn.Module):
    """The tied embedding / lm_head matrix (V, C) laid out for decoding on the CPU: ``blocks``
    slices of the vocabulary, each stored column-major, in one (blocks, C, width) Parameter
    (V padded with zero rows up to blocks * width). The logits are one batched matmul over
    the slices, ``x @ W_i.T`` each on a row-major (C, width) matrix, cut back to V.

    Why: MKL's single GEMM over a (V, C) matrix is slow at the few rows a decode or verify
    step multiplies on the CPU, and a batch of narrower column-major products is not (the
    eager and TorchScript rows of the bench show the effect). 32 slices: a multiple of the
    usual thread counts, and the zero padding stays under 32 rows.
    """

    def __init__(self, weight: torch.Tensor, blocks: int = 32):
        super().__init__()
        V, C = weight.shape
        width = -(-V // blocks)
        padded = F.pad(weight.detach(), (0, 0, 0, blocks * width - V))
        self.weight = nn.Parameter(padded.view(blocks, width, C).transpose(1, 2).contiguous(),
                                   requires_grad=False)
        self.vocab_size = V

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., V)"""
        *lead, C = h.shape
        x = h.reshape(1, -1, C).expand(self.weight.size(0), -1, -1)
        logits = torch.bmm(x, self.weight)  # (blocks, rows, width)
        return logits.transpose(0, 1).reshape(*lead, -1)[..., :self.vocab_size]


class BlockedEmbedding(nn.Module):
    """Token embedding read from a ``BlockedHead``'s Parameter (tied: the same one)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight  # (blocks, C, width)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        width = self.weight.size(2)
        return self.weight[idx // width, :, idx % width]  # (B, T, C)


def blocked_head(model: GPT) -> GPT:
    """A copy of ``model`` for inference whose tied embedding / lm_head is a ``BlockedHead``.
    Every other Parameter is shared with ``model``, which is left as it was; an already
    blocked model is returned as is.
    """
    if isinstance(model.lm_head, BlockedHead):
        return model
    shared = {id(p): p for p in model.parameters()}  # deepcopy maps each to itself
    out = copy.deepcopy(model, shared)
    out.lm_head = BlockedHead(model.lm_head.weight)
    out.transformer.wte = BlockedEmbedding(out.lm_head.weight)
    return out


def empty_kv(config: GPTConfig, batch: int, device=None, dtype: torch.dtype = torch.float32) -> KV:
    """A functional cache with no past positions: 2 * n_layer tensors (batch, n_head, 0,
    head_dim), the layout ``forward_kv`` and the exported cache graphs take."""
    c = config
    empty = torch.zeros(batch, c.n_head, 0, c.head_dim, device=device, dtype=dtype)
    return (empty,) * (2 * c.n_layer)


def positions(ref: torch.Tensor, start, n) -> torch.Tensor:
    """``start, start+1, ..., start+n-1`` (int64) on ``ref``'s device.

    Not ``torch.arange(..., device=ref.device)``: ``torch.jit.trace`` records that device as
    a constant, so a graph traced on the CPU would build its positions on the CPU forever
    (and fail next to CUDA weights). ``new_ones`` takes the device from ``ref`` at run time.
    """
    return ref.new_ones(n, dtype=torch.long).cumsum(0) + (start - 1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, S) for an attention mask (B, S): each row counts its real tokens
    from 0; left padding gets 0 (it is masked out anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def mask_and_positions(q_pos: torch.Tensor, n_keys: int, attention_mask: torch.Tensor | None):
    """Attention mask and position ids for queries at absolute slots ``q_pos`` (T,).

    Without padding: a (T, S) causal mask and positions q_pos. With a padding mask (B, S):
    a (B, 1, T, S) mask that also hides padded keys, and per-row positions that count only
    real tokens. Every query may see itself, so a padded row never has an empty softmax
    (which would produce NaN and leak through the cache).
    """
    keys = positions(q_pos, 0, n_keys)
    causal = keys[None, :] <= q_pos[:, None]  # (T, S)
    if attention_mask is None:
        return causal, q_pos
    real = attention_mask.bool()  # (B, S)
    pos = positions_from_mask(attention_mask).index_select(1, q_pos)  # (B, T)
    self_key = keys[None, :] == q_pos[:, None]  # (T, S)
    mask = (causal[None] & real[:, None, :]) | self_key[None]  # (B, T, S)
    return mask[:, None], pos
