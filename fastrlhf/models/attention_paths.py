"""The packed-attention paths (see ``fastrlhf.models.attention`` for the dispatch).

Each takes HF's [1, H, N, D] query/key/value of one packed row and a ``VarlenMask``
(cu_seqlens, max_seqlen, lazily built masks) and returns [1, N, Hq, D].

Legend: N = packed tokens, B = sequences, Hq/Hkv = query/key-value heads, D = head dim,
L = one sequence's length.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Above this many packed tokens an [N, N] mask costs more than looping over sequences.
MASK_MAX_TOKENS = 4096


@dataclass
class VarlenMask:
    """Per-forward state shared by all layers (masks built lazily, at most once each)."""

    cu_seqlens: torch.Tensor  # [B+1] int32, on the tokens' device
    max_seqlen: int
    choice: object = None  # attention.AttentionChoice
    num_tokens: int | None = None  # N, set from the first layer's query (no device sync)
    _lengths: list[int] | None = None
    _causal: torch.Tensor | None = None  # [N, N] bool
    _windowed: dict[int, torch.Tensor] = field(default_factory=dict)
    _blocks: dict = field(default_factory=dict)  # flex block masks by window

    def lengths(self) -> list[int]:
        """Host copy of the sequence lengths (one device sync per forward, not per layer)."""
        if self._lengths is None:
            self._lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()
        return self._lengths

    def doc_ids(self) -> torch.Tensor:
        """[N] int64 sequence index of every packed token (on device, no sync)."""
        cu = self.cu_seqlens.long()
        n = self.num_tokens if self.num_tokens is not None else int(cu[-1])
        idx = torch.arange(n, device=cu.device)
        return torch.searchsorted(cu[1:], idx, right=True)

    def block_causal(self, sliding_window: int | None) -> torch.Tensor:
        """[N, N] bool: True where query i may attend key j (same sequence, j <= i)."""
        if self._causal is None:
            doc = self.doc_ids()
            idx = torch.arange(doc.shape[0], device=doc.device)
            self._causal = (doc[:, None] == doc[None, :]) & (idx[:, None] >= idx[None, :])
        if sliding_window is None:
            return self._causal
        if sliding_window not in self._windowed:
            self._windowed[sliding_window] = self._causal & _window(
                self._causal.shape[0], sliding_window, self._causal.device
            )
        return self._windowed[sliding_window]


def _window(n: int, window: int, device) -> torch.Tensor:
    """[n, n] bool: key j within the ``window`` most recent positions of query i."""
    idx = torch.arange(n, device=device)
    return (idx[:, None] - idx[None, :]) < window  # same sequence: index gap == position gap


def _expand_kv(query, key, value):
    """Repeat key/value heads for GQA: SDPA's fused CUDA kernels take no enable_gqa + mask."""
    rep = query.shape[1] // key.shape[1]
    if rep == 1:
        return key, value
    return key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)


def sdpa_block_mask(query, key, value, varlen_mask, dropout, scaling, sliding_window):
    """SDPA over the whole row with a block-diagonal causal [N, N] mask -> [1, N, Hq, D]."""
    key, value = _expand_kv(query, key, value)
    allowed = varlen_mask.block_causal(sliding_window)  # [N, N]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed[None, None], dropout_p=dropout, scale=scaling
    )  # [1, Hq, N, D]
    return out.transpose(1, 2)


def sdpa_per_sequence(query, key, value, varlen_mask, dropout, scaling, sliding_window=None):
    """SDPA on each sequence's slice -> [1, N, Hq, D]: causal without a mask (PyTorch's
    flash kernels), or with an [L, L] window mask for sliding layers.

    One launch per sequence and a host sync for the lengths; memory O(max L^2).
    """
    key, value = _expand_kv(query, key, value)
    outs = []
    for q, k, v in zip(*(t.split(varlen_mask.lengths(), dim=2) for t in (query, key, value))):
        n = q.shape[2]
        if sliding_window is None or sliding_window >= n:
            o = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=scaling, is_causal=True
            )
        else:
            idx = torch.arange(n, device=q.device)
            mask = (idx[:, None] >= idx[None, :]) & _window(n, sliding_window, q.device)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling
            )
        outs.append(o)  # [1, Hq, L_b, D]
    return torch.cat(outs, dim=2).transpose(1, 2)  # [1, N, Hq, D]


def eager_document(
    module, query, key, value, varlen_mask, dropout, scaling, sliding_window, *, softcap, **kw
):
    """The family's own eager attention with the per-document additive mask -> [1, N, Hq, D].

    Using transformers' ``eager_attention_forward`` of the model's own module keeps every
    family detail (soft-capping, GQA repeat, fp32 softmax) exactly as HF computes it.
    """
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        fn = _plain_eager
    extra = {"softcap": softcap} if softcap is not None else {}
    for name in ("s_aux", "sinks"):  # attention sinks (e.g. gpt-oss) go to their own code
        if kw.get(name) is not None:
            extra[name] = kw[name]
    neg = torch.finfo(query.dtype).min
    if query.shape[2] <= MASK_MAX_TOKENS:
        allowed = varlen_mask.block_causal(sliding_window)[None, None]  # [1, 1, N, N]
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~allowed, neg)
        return fn(module, query, key, value, mask, dropout=dropout, scaling=scaling, **extra)[0]
    outs = []
    for q, k, v in zip(*(t.split(varlen_mask.lengths(), dim=2) for t in (query, key, value))):
        n = q.shape[2]
        idx = torch.arange(n, device=q.device)
        allowed = idx[:, None] >= idx[None, :]
        if sliding_window is not None:
            allowed = allowed & _window(n, sliding_window, q.device)
        mask = torch.zeros(n, n, dtype=q.dtype, device=q.device).masked_fill(~allowed, neg)
        o = fn(module, q, k, v, mask[None, None], dropout=dropout, scaling=scaling, **extra)[0]
        outs.append(o)  # [1, L_b, Hq, D]
    return torch.cat(outs, dim=1)


def _plain_eager(module, query, key, value, mask, dropout=0.0, scaling=None, softcap=None):
    """Eager attention as transformers' Llama/Gemma2 write it (for modules without one)."""
    key, value = _expand_kv(query, key, value)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def torch_varlen(
    query, key, value, varlen_mask, dropout, scaling, sliding_window, *, num_splits=None
):
    """``torch.nn.attention.varlen.varlen_attn`` on [N, H, D] views -> [1, N, Hq, D].

    ``query[0].transpose(0, 1)`` is a view of the projection's [N, Hq*D] output (no copy);
    GQA is native (``enable_gqa``), the lengths stay on the device (max_seqlen is the
    caller's Python int), and ``num_splits=1`` turns split-KV off (batch-invariant).
    """
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, H, D] views
    cu = varlen_mask.cu_seqlens
    if cu.dtype != torch.int32:
        cu = cu.to(torch.int32)
    window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    out = varlen_attn(
        q,
        k,
        v,
        cu,
        cu,
        varlen_mask.max_seqlen,
        varlen_mask.max_seqlen,
        scale=scaling,
        window_size=window,
        enable_gqa=q.shape[1] != k.shape[1],
        num_splits=num_splits,
    )  # [N, Hq, D]
    return out[None]


def _flash_varlen(
    query, key, value, varlen_mask, dropout, scaling, sliding_window, *, softcap=None
):
    from flash_attn import flash_attn_varlen_func

    # flash-attn wants [N, H, D] (views here); GQA is native (Hkv divides Hq)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    cu = varlen_mask.cu_seqlens.to(dtype=torch.int32)
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        cu,
        cu,
        varlen_mask.max_seqlen,
        varlen_mask.max_seqlen,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
        window_size=window,
        softcap=0.0 if softcap is None else float(softcap),
    )  # [N, Hq, D]
    return out[None]


_COMPILED_FLEX = {}


def flex_document(
    query, key, value, varlen_mask, dropout, scaling, sliding_window, *, softcap=None
):
    """FlexAttention with a document (+ window) block mask and a soft-capping score_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if dropout:
        raise ValueError("model.attention=flex has no attention dropout")
    n = query.shape[2]
    if sliding_window not in varlen_mask._blocks:
        doc = varlen_mask.doc_ids()
        w = sliding_window

        def document(b, h, q_idx, kv_idx):
            ok = (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
            return ok if w is None else ok & (q_idx - kv_idx < w)

        varlen_mask._blocks[sliding_window] = create_block_mask(
            document, None, None, n, n, device=query.device
        )
    score_mod = None
    if softcap is not None:
        cap = float(softcap)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / cap) * cap

    fn = flex_attention
    if query.is_cuda:  # uncompiled flex is a slow reference; compiled it is a Triton kernel
        fn = _COMPILED_FLEX.setdefault("fn", torch.compile(flex_attention, dynamic=True))
    out = fn(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=varlen_mask._blocks[sliding_window],
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )  # [1, Hq, N, D]
    return out.transpose(1, 2)
