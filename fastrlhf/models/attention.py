"""Padding-free (varlen) attention for HF decoder models, plugged in through
``transformers.AttentionInterface`` under the name ``"fastrlhf_varlen"``.

The model sees one row of N packed tokens; ``cu_seqlens`` [B+1] (int32 prefix sums of
the sequence lengths) and ``max_seqlen`` travel as keyword arguments from the model's
forward down to every attention call (transformers passes unknown kwargs through its
decoder layers). Because the name is not in transformers' mask registry, the model
builds no mask of its own; this function makes the per-document mask itself:

- CUDA with flash-attn installed: ``flash_attn_varlen_func`` (no mask at all).
- CUDA without flash-attn (or > MASK_MAX_TOKENS packed tokens), no sliding window:
  ``scaled_dot_product_attention(is_causal=True)`` on each sequence's slice, so
  PyTorch's own flash kernel runs and no mask exists (one launch per sequence).
- otherwise (CPU, sliding windows): SDPA over the row with a block-diagonal causal
  bool mask [N, N] built once per forward from cu_seqlens (``VarlenMask``, shared by
  the layers). O(N^2) bits, fine for CPU-sized batches.

Sliding-window layers (Mistral, Qwen2) pass ``sliding_window=W`` and then a query
sees only the W most recent keys of its own sequence, as in transformers' masks.

Legend: N = packed tokens, B = sequences, Hq/Hkv = query/key-value heads, D = head dim.
Registration (``register_varlen_attention``) is explicit and idempotent; nothing
happens at import. Padded batches and generate() need a mask this function cannot see:
run them under ``padded_attention(model)``, which switches the model to SDPA meanwhile.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "fastrlhf_varlen"


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


# Above this many packed tokens the [N, N] mask costs more than looping over sequences.
MASK_MAX_TOKENS = 4096


@dataclass
class VarlenMask:
    """Per-forward state shared by all layers (built lazily, at most once per forward)."""

    cu_seqlens: torch.Tensor  # [B+1] int32
    max_seqlen: int
    _lengths: list[int] | None = None
    _causal: torch.Tensor | None = None  # [N, N] bool
    _windowed: dict[int, torch.Tensor] = field(default_factory=dict)

    def lengths(self) -> list[int]:
        """Host copy of the sequence lengths (one device sync per forward, not per layer)."""
        if self._lengths is None:
            self._lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()
        return self._lengths

    def block_causal(self, sliding_window: int | None) -> torch.Tensor:
        """[N, N] bool: True where query i may attend key j (same sequence, j <= i)."""
        if self._causal is None:
            cu = self.cu_seqlens.long()
            n = int(cu[-1])
            idx = torch.arange(n, device=cu.device)
            # sequence id of token t = number of sequence ends <= t
            doc = torch.searchsorted(cu[1:], idx, right=True)  # [N]
            same_doc = doc[:, None] == doc[None, :]  # [N, N]
            self._causal = same_doc & (idx[:, None] >= idx[None, :])
        if sliding_window is None:
            return self._causal
        if sliding_window not in self._windowed:
            n = self._causal.shape[0]
            idx = torch.arange(n, device=self._causal.device)
            # inside one sequence, index distance equals position distance
            recent = (idx[:, None] - idx[None, :]) < sliding_window
            self._windowed[sliding_window] = self._causal & recent
        return self._windowed[sliding_window]


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, Hq, N, D]
    key: torch.Tensor,  # [1, Hkv, N, D]
    value: torch.Tensor,  # [1, Hkv, N, D]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    varlen_mask: VarlenMask | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over packed sequences; returns ([1, N, Hq, D], None) like HF's functions."""
    if query.shape[0] != 1:
        raise ValueError(
            f"{VARLEN_ATTENTION} expects one packed row (batch 1), got query {tuple(query.shape)}"
        )
    if cu_seqlens is None and varlen_mask is None:
        raise ValueError(
            f"{VARLEN_ATTENTION} attention needs cu_seqlens (and max_seqlen) passed to the "
            "model's forward: use PolicyModel/ValueModel.forward for packed batches, and "
            "`with padded_attention(model):` around padded forwards and generate()"
        )
    if varlen_mask is None:
        varlen_mask = VarlenMask(cu_seqlens, int(max_seqlen or 0))
    if sliding_window is not None and sliding_window >= varlen_mask.max_seqlen > 0:
        sliding_window = None  # the window covers every sequence: plain causal

    half = query.dtype in (torch.float16, torch.bfloat16)
    if query.is_cuda and half and flash_attn_available():
        out = _flash_varlen(query, key, value, varlen_mask, dropout, scaling, sliding_window)
    elif sliding_window is None and (query.is_cuda or query.shape[2] > MASK_MAX_TOKENS):
        out = sdpa_per_sequence(query, key, value, varlen_mask, dropout, scaling)
    else:
        out = sdpa_block_mask(query, key, value, varlen_mask, dropout, scaling, sliding_window)
    return out, None


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


def sdpa_per_sequence(query, key, value, varlen_mask, dropout, scaling):
    """Causal SDPA on each sequence's slice (no mask, PyTorch's flash kernels) -> [1, N, Hq, D].

    One launch per sequence; memory O(max L^2) on the math path instead of O(N^2).
    """
    key, value = _expand_kv(query, key, value)
    lengths = varlen_mask.lengths()
    outs = [
        F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True
        )  # [1, Hq, L_b, D]
        for q, k, v in zip(
            query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)
        )
    ]
    return torch.cat(outs, dim=2).transpose(1, 2)  # [1, N, Hq, D]


def _flash_varlen(query, key, value, varlen_mask, dropout, scaling, sliding_window):
    from flash_attn import flash_attn_varlen_func

    # flash-attn wants [N, H, D]; GQA is native (Hkv divides Hq)
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    cu = varlen_mask.cu_seqlens.to(device=q.device, dtype=torch.int32)
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
    )  # [N, Hq, D]
    return out[None]


def register_varlen_attention() -> str:
    """Register ``varlen_attention_forward`` with transformers (idempotent); return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    return VARLEN_ATTENTION


@contextlib.contextmanager
def padded_attention(model: torch.nn.Module, impl: str = "sdpa") -> Iterator[None]:
    """Temporarily switch a HF model from packed attention to ``impl`` (default SDPA).

    Our packed attention has no mask registered with transformers (so packed forwards
    build none and never sync), which also means it cannot see a padding mask: padded
    batches and ``generate()`` (KV cache, left padding) must run under this context.
    """
    previous = model.config._attn_implementation
    if previous != VARLEN_ATTENTION:
        yield
        return
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def resolve_attn_impl(attn_impl: str) -> str:
    """Map our ``attn_impl`` setting to a transformers ``attn_implementation`` name.

    "auto" / "varlen" -> our packed attention (flash-attn varlen or masked SDPA);
    any other value ("sdpa", "eager", "flash_attention_2", ...) is passed to
    transformers unchanged, whose own packed-sequence detection (from position_ids)
    then handles the packed forward.
    """
    if attn_impl in ("auto", "varlen", VARLEN_ATTENTION):
        return register_varlen_attention()
    return attn_impl
