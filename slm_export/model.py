"""A nanoGPT-style GPT with two cache paths for fast decoding.

Three ways to run the same weights:
- ``forward(idx, targets=None)``: the training / full-recompute path (causal SDPA).
- ``forward_kv(idx, past)``: functional KV cache. ``past`` holds the keys and values of the
  previous positions, one (B, n_head, P, head_dim) tensor each per layer (``KV``: k_0, v_0,
  k_1, v_1, ..., P >= 0, the layout optimum and onnxruntime-genai use); it returns the
  logits of the last positions and the grown cache. Pure tensors in and out, so it traces
  and exports (TorchScript, ONNX) with dynamic batch, sequence and past lengths.
- ``forward_static(idx, input_pos, caches)``: a preallocated cache (``KVCache``) written in
  place at ``input_pos``; shapes never change, which is what ``torch.compile`` and CUDA
  graphs want.
All three share the blocks below; only where keys/values come from differs.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from slm_export.config import GPTConfig


class KVCache(nn.Module):
    """Preallocated keys/values for one layer, updated in place (gpt-fast style)."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos: (T,), k/v: (B, nh, T, hs)
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


KV = tuple[torch.Tensor, ...]  # (k_0, v_0, k_1, v_1, ...): 2 * n_layer tensors (B, nh, P, hs)


class _GrowingCache:
    """Functional cache for one layer: the past keys/values with the new ones appended,
    which is both what attention reads and the layer's present (one copy per step)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (B, nh, P, hs)

    def update(self, k: torch.Tensor, v: torch.Tensor):
        self.k = torch.cat([self.k, k], dim=2)  # (B, nh, P + T, hs)
        self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v


class _StaticSlot:
    """Binds one layer's KVCache to the positions being written this call."""

    def __init__(self, cache: KVCache, input_pos: torch.Tensor):
        self.cache, self.input_pos = cache, input_pos

    def update(self, k: torch.Tensor, v: torch.Tensor):
        return self.cache.update(self.input_pos, k, v)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache=None, mask: torch.Tensor | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        if hasattr(cache, "attend"):  # a cache that runs attention itself (export/attention_op.py)
            return self.resid_dropout(self.c_proj(cache.attend(q, k, v, self.n_head)))
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nh, S, hs), S >= T
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
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
        cannot slide). ``cache(k, v)`` makes a layer's cache from its past (default: the
        concat of ``_GrowingCache``; the ONNX export's runs a fused attention op).
        """
        T, P = idx.size(1), past[0].size(2)
        q_pos = positions(idx, P, T)
        mask, pos = _mask_and_positions(q_pos, P + T, attention_mask)
        if position_ids is not None:
            pos = position_ids
        new_cache = cache or _GrowingCache
        caches = [new_cache(past[2 * i], past[2 * i + 1]) for i in range(self.config.n_layer)]
        h = self._hidden(idx, pos, caches, mask)
        present = tuple(t for c in caches for t in (c.k, c.v))
        return self.lm_head(h[:, -logits_to_keep:]), present

    def new_static_caches(self, batch: int, max_len: int | None = None,
                          device=None, dtype=None) -> nn.ModuleList:
        c = self.config
        ref = self.lm_head.weight
        return nn.ModuleList(
            KVCache(batch, c.n_head, max_len or c.block_size, c.head_dim,
                    dtype=dtype or ref.dtype, device=device or ref.device)
            for _ in range(c.n_layer)
        )

    def forward_static(self, idx: torch.Tensor, input_pos: torch.Tensor, caches: nn.ModuleList,
                       attention_mask: torch.Tensor | None = None, all_logits: bool = False,
                       logits_index: torch.Tensor | None = None):
        """idx (B, T) written at input_pos (T,) into preallocated caches -> logits (B, V) of
        the last position, or (B, T, V) of every new one with ``all_logits``, or (B, K, V)
        of the new positions ``logits_index`` (K,) names (a tensor: one exported graph
        serves both the last position and all of them).

        ``attention_mask`` (B, max_len) marks real tokens (1) and left padding (0).
        """
        mask, pos = _mask_and_positions(input_pos, caches[0].k.size(2), attention_mask)
        slots = [_StaticSlot(cache, input_pos) for cache in caches]
        h = self._hidden(idx, pos, slots, mask)
        if logits_index is not None:
            return self.lm_head(h.index_select(1, logits_index))
        return self.lm_head(h if all_logits else h[:, -1, :])


class BlockedHead(nn.Module):
    """The tied embedding / lm_head matrix (V, C) laid out for decoding on the CPU: ``blocks``
    slices of the vocabulary, each stored column-major, in one (blocks, C, width) Parameter
    (V padded with zero rows up to blocks * width). The logits are one batched matmul over
    the slices, ``x @ W_i.T`` each on a row-major (C, width) matrix, cut back to V.

    MKL's single GEMM is slow on this shape at the few rows a decode or verify step has
    (the 30m model, 2 threads, torch 2.13: 6.3 ms for 1 row and 12.8 for 6 on the row-major
    matrix, 2.8 and 11.6 column-major) where the batched one takes 2.3 and 5.8 ms
    (``bench/lm_head_layouts.py``, bench/RESULTS.md). 32 slices: a multiple of the usual
    thread counts, and the zero padding stays under 32 rows.
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
    """A copy of ``model`` for inference whose tied embedding / lm_head is a ``BlockedHead``
    (the lm_head at ~1.3x the speed of a column-major matrix at one row, ~2x at the 5-7 rows
    of a speculative verify step, on 2 CPU threads). Every other Parameter is shared with
    ``model``, which is left as it was; an already blocked model is returned as is.
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


def _mask_and_positions(q_pos: torch.Tensor, n_keys: int, attention_mask: torch.Tensor | None):
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
