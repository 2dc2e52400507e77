"""Padding-free (varlen) attention for HF decoder models, plugged in through
``transformers.AttentionInterface`` under the name ``"fastrlhf_varlen"``, and the one
dispatch (``model.attention``) that picks how it runs.

The model sees one row of N packed tokens; ``cu_seqlens`` [B+1] (int32 prefix sums of
the sequence lengths) and ``max_seqlen`` travel as keyword arguments from the model's
forward down to every attention call (transformers passes unknown kwargs through its
decoder layers). Because the name is not in transformers' mask registry, the model
builds no mask of its own; this module makes the per-document attention itself, by one
of these paths (``choose_attention`` picks one per model and device, once):

- ``torch_varlen``: PyTorch's own FlashAttention, ``torch.nn.attention.varlen.varlen_attn``
  (CUDA; traces on the meta device). Sliding windows, GQA; no soft-capping.
- ``flash_attn``: ``flash_attn_varlen_func`` of the optional flash-attn package (CUDA);
  sliding windows, GQA and soft-capping.
- ``flex``: FlexAttention with a document block mask (and a soft-capping ``score_mod``);
  compiled to Triton on CUDA. No backward on CPU, so refused there.
- ``sdpa``: SDPA with the block-diagonal causal (+ window) mask [N, N] for short rows on
  CPU, or one SDPA call per sequence (CUDA, long rows). No soft-capping.
- ``eager``: the family's own eager attention (transformers' ``eager_attention_forward``
  of the model's module) with the per-document additive mask: exact for anything that
  family's eager code does (soft-capping included), O(N^2) memory; one call per sequence
  above ``MASK_MAX_TOKENS``.

``auto``: on CUDA ``torch_varlen`` when the layers need no soft-capping (nor attention
dropout), else ``flash_attn`` if installed, else ``eager``; on CPU ``sdpa``, or ``eager``
for soft-capped models. An explicit choice that cannot serve the model raises one line
(``AttentionUnavailable``), never an approximation.

Sliding-window layers pass ``sliding_window=W``: a query sees the W most recent keys of
its own sequence (itself included), as transformers' masks do (``kv > q - W``); the
varlen kernels get ``window_size=(W - 1, 0)``.

Legend: N = packed tokens, B = sequences, Hq/Hkv = query/key-value heads, D = head dim.
Registration (``register_varlen_attention``) is explicit and idempotent; nothing
happens at import. Padded batches and generate() need a mask this function cannot see:
run them under ``padded_attention(model)``, which switches the model to SDPA (eager for
families SDPA cannot serve) meanwhile.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger("fastrlhf.models")

VARLEN_ATTENTION = "fastrlhf_varlen"
ATTENTION_PATHS = ("flash_attn", "torch_varlen", "flex", "sdpa", "eager")
ATTENTION_CHOICES = ("auto", *ATTENTION_PATHS)
# Above this many packed tokens an [N, N] mask costs more than looping over sequences.
MASK_MAX_TOKENS = 4096
_HALF = (torch.float16, torch.bfloat16)
_NOTED: set[str] = set()
# The packed forward in progress (set by models.loading.packed_hidden): the fallback for
# families whose layers do not pass keyword arguments down to attention (StableLM).
CURRENT_MASK: contextvars.ContextVar = contextvars.ContextVar("fastrlhf_varlen_mask", default=None)


class AttentionUnavailable(ValueError):
    """A requested attention path cannot compute what the model's layers need."""


def _note_once(message: str, level: int = logging.WARNING) -> None:
    if message not in _NOTED:
        _NOTED.add(message)
        logger.log(level, message)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def torch_varlen_available() -> bool:
    try:
        return importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except ModuleNotFoundError:  # pragma: no cover - torch without torch.nn.attention
        return False


# ---------------------------------------------------------------------------------------
# the dispatch


@dataclass(frozen=True)
class AttentionNeeds:
    """What a model's attention layers compute beyond causal softmax attention."""

    model_class: str
    softcap: float | None = None  # attention-logit soft-capping (Gemma2)
    sliding_window: int | None = None  # any layer slides
    dropout: float = 0.0  # attention dropout while training
    sinks: bool = False  # learned attention sinks (GPT-OSS): only the family's eager code

    @classmethod
    def of(cls, model: torch.nn.Module) -> AttentionNeeds:
        cfg = model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        softcap = getattr(text, "attn_logit_softcapping", None)
        window = getattr(text, "sliding_window", None)
        if getattr(text, "use_sliding_window", True) is False:
            window = None
        return cls(
            model_class=type(model).__name__,
            softcap=float(softcap) if softcap else None,
            sliding_window=int(window) if window else None,
            dropout=float(getattr(text, "attention_dropout", 0.0) or 0.0),
            sinks=any(name.endswith(".sinks") for name, _ in model.named_parameters()),
        )


@dataclass(frozen=True)
class AttentionChoice:
    """The path packed forwards of one model take, and why."""

    path: str  # one of ATTENTION_PATHS
    reason: str
    num_splits: int | None = None  # torch_varlen: 1 = batch-invariant (no split-KV)


def choose_attention(
    requested: str,
    needs: AttentionNeeds,
    device_type: str,
    *,
    batch_invariant: bool = False,
) -> AttentionChoice:
    """The path for ``requested`` ("auto" or one of ATTENTION_PATHS) on ``device_type``.

    "meta" counts as CUDA (shape and memory estimates trace the CUDA path). Raises
    ``AttentionUnavailable`` (one line) when an explicit choice cannot serve the model.
    """
    if requested not in ATTENTION_CHOICES:
        raise AttentionUnavailable(
            f"model.attention={requested!r} is not one of {list(ATTENTION_CHOICES)}"
        )
    gpu = device_type in ("cuda", "meta")
    splits = 1 if batch_invariant else None
    name = needs.model_class
    cap = f"{name} soft-caps attention logits (attn_logit_softcapping={needs.softcap})"
    if needs.sinks:
        if requested in ("auto", "eager"):
            return AttentionChoice("eager", f"{name} has attention sinks: its eager code")
        raise AttentionUnavailable(
            f"model.attention={requested} cannot serve {name}: it has attention sinks, "
            "which only its eager attention computes; use eager"
        )
    if requested == "auto":
        if not gpu:
            if needs.softcap is not None:
                return AttentionChoice("eager", f"{cap}: SDPA cannot; exact eager on {device_type}")
            return AttentionChoice("sdpa", f"{device_type}: SDPA with the per-document mask")
        if needs.softcap is None and needs.dropout == 0.0 and torch_varlen_available():
            return AttentionChoice("torch_varlen", "CUDA: PyTorch's varlen FlashAttention", splits)
        if flash_attn_available():
            return AttentionChoice("flash_attn", "CUDA, flash-attn installed", splits)
        if needs.softcap is not None:
            return AttentionChoice(
                "eager", f"{cap} and flash-attn is not installed: exact eager fallback"
            )
        return AttentionChoice("sdpa", "CUDA with attention dropout: per-sequence SDPA")
    refuse = f"model.attention={requested} cannot serve {name}:"
    if requested in ("flash_attn", "torch_varlen") and not gpu:
        raise AttentionUnavailable(f"{refuse} it needs CUDA (device is {device_type})")
    if requested == "flash_attn" and not flash_attn_available():
        raise AttentionUnavailable(
            f"{refuse} flash-attn is not installed (pip install fastrlhf[flash])"
        )
    if requested == "torch_varlen":
        if not torch_varlen_available():
            raise AttentionUnavailable(f"{refuse} this torch has no torch.nn.attention.varlen")
        if needs.softcap is not None:
            raise AttentionUnavailable(f"{refuse} {cap}; use flash_attn, flex or eager")
        if needs.dropout:
            raise AttentionUnavailable(
                f"{refuse} attention_dropout={needs.dropout} (varlen_attn has no dropout)"
            )
    if requested == "flex" and not gpu:
        raise AttentionUnavailable(f"{refuse} FlexAttention has no backward on {device_type}")
    if requested == "sdpa" and needs.softcap is not None:
        raise AttentionUnavailable(f"{refuse} {cap}; use eager, flex or flash_attn")
    return AttentionChoice(requested, "requested by model.attention", splits)


def configure_attention(
    model: torch.nn.Module, requested: str = "auto", *, batch_invariant: bool = False
) -> AttentionChoice:
    """Choose the path for ``model`` (on its parameters' device), remember it, log it once."""
    try:
        device_type = next(model.parameters()).device.type
    except StopIteration:  # pragma: no cover - a model without parameters
        device_type = "cpu"
    choice = choose_attention(
        requested, AttentionNeeds.of(model), device_type, batch_invariant=batch_invariant
    )
    # plain attributes (not saved): the CausalLM and its backbone both reach packed_hidden
    for m in (model, getattr(model, "base_model", model)):
        m.__dict__["_fastrlhf_attention"] = choice
    _note_once(
        f"packed attention for {type(model).__name__}: {choice.path} ({choice.reason})"
        + (", num_splits=1 (batch-invariant)" if choice.num_splits == 1 else ""),
        logging.INFO,
    )
    return choice


def attention_choice(model: torch.nn.Module) -> AttentionChoice:
    """The remembered choice of ``model``; "auto" for its device when none was made."""
    choice = model.__dict__.get("_fastrlhf_attention")
    return choice if choice is not None else configure_attention(model)


# ---------------------------------------------------------------------------------------
# the packed attention function


@dataclass
class VarlenMask:
    """Per-forward state shared by all layers (masks built lazily, at most once each)."""

    cu_seqlens: torch.Tensor  # [B+1] int32, on the tokens' device
    max_seqlen: int
    choice: AttentionChoice | None = None
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


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, Hq, N, D]
    key: torch.Tensor,  # [1, Hkv, N, D]
    value: torch.Tensor,  # [1, Hkv, N, D]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
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
        varlen_mask = CURRENT_MASK.get()
    if cu_seqlens is None and varlen_mask is None:
        raise ValueError(
            f"{VARLEN_ATTENTION} attention needs cu_seqlens (and max_seqlen) passed to the "
            "model's forward: use PolicyModel/ValueModel.forward for packed batches, and "
            "`with padded_attention(model):` around padded forwards and generate()"
        )
    if varlen_mask is None:
        varlen_mask = VarlenMask(cu_seqlens, int(max_seqlen or 0))
    if varlen_mask.num_tokens is None:
        varlen_mask.num_tokens = query.shape[2]
    if sliding_window is not None and sliding_window >= varlen_mask.max_seqlen > 0:
        sliding_window = None  # the window covers every sequence: plain causal
    choice = varlen_mask.choice or AttentionChoice("auto", "")
    sinks = any(kwargs.get(name) is not None for name in ("s_aux", "sinks"))
    path = _runtime_path(choice.path, query, softcap, dropout, sinks)
    args = (query, key, value, varlen_mask, dropout, scaling, sliding_window)
    if path == "torch_varlen":
        out = torch_varlen(*args, num_splits=choice.num_splits)
    elif path == "flash_attn":
        out = _flash_varlen(*args, softcap=softcap)
    elif path == "flex":
        out = flex_document(*args, softcap=softcap)
    elif path == "eager":
        out = eager_document(module, *args, softcap=softcap, **kwargs)
    elif query.is_cuda or query.shape[2] > MASK_MAX_TOKENS:
        out = sdpa_per_sequence(*args)
    else:
        out = sdpa_block_mask(*args)
    return out, None


def _runtime_path(path: str, query: torch.Tensor, softcap, dropout, sinks=False) -> str:
    """The chosen path, or the exact one to take when this call cannot use it."""
    if sinks and path != "eager":
        # attention sinks (gpt-oss and others) live in the family's eager code only
        _note_once("attention sinks seen at run time: using the family's eager attention")
        return "eager"
    on_gpu = query.is_cuda or query.is_meta
    if path == "auto":  # no choice made (a bare HF model): what "auto" picks per call
        if softcap is not None:
            path = "flash_attn" if on_gpu and flash_attn_available() else "eager"
        elif on_gpu and dropout == 0.0 and torch_varlen_available():
            path = "torch_varlen"
        else:
            path = "sdpa"
    if softcap is not None and path in ("torch_varlen", "sdpa"):
        # the config did not announce the cap; compute it exactly rather than drop it
        _note_once(f"attention soft-capping ({softcap}) seen at run time: using eager")
        return "eager"
    if path == "torch_varlen" and dropout:
        _note_once("attention dropout > 0: varlen_attn has none, per-sequence SDPA instead")
        return "sdpa"
    if path in ("torch_varlen", "flash_attn") and query.is_cuda and query.dtype not in _HALF:
        # the flash kernels take fp16/bf16 only; fp32 activations (no autocast) go exact
        _note_once(f"{path} needs fp16/bf16 activations, got {query.dtype}: using SDPA/eager")
        return "eager" if softcap is not None else "sdpa"
    return path


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
        raise AttentionUnavailable("model.attention=flex has no attention dropout")
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


# ---------------------------------------------------------------------------------------
# registration and padded forwards


def register_varlen_attention() -> str:
    """Register ``varlen_attention_forward`` with transformers (idempotent); return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    return VARLEN_ATTENTION


def padded_impl(model: torch.nn.Module) -> str:
    """SDPA for padded forwards, or eager where the family's SDPA path refuses (soft-capped
    attention: Gemma2 declares no SDPA support and would raise)."""
    needs = AttentionNeeds.of(model)
    if needs.softcap is not None or not getattr(model, "_supports_sdpa", True):
        _note_once(f"{needs.model_class}: padded forwards and generate() use eager attention")
        return "eager"
    return "sdpa"


@contextlib.contextmanager
def padded_attention(model: torch.nn.Module, impl: str | None = None) -> Iterator[None]:
    """Temporarily switch a HF model from packed attention to ``impl`` (default: SDPA, or
    eager for families SDPA cannot serve; see ``padded_impl``).

    Our packed attention has no mask registered with transformers (so packed forwards
    build none and never sync), which also means it cannot see a padding mask: padded
    batches and ``generate()`` (KV cache, left padding) must run under this context.
    """
    previous = model.config._attn_implementation
    if previous != VARLEN_ATTENTION:
        yield
        return
    model.set_attn_implementation(impl or padded_impl(model))
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def resolve_attn_impl(attn_impl: str) -> str:
    """Map our ``attn_impl`` setting to a transformers ``attn_implementation`` name.

    "auto" / "varlen" -> our packed attention (the path from ``model.attention``);
    any other value ("sdpa", "eager", "flash_attention_2", ...) is passed to
    transformers unchanged, whose own packed-sequence detection (from position_ids)
    then handles the packed forward.
    """
    if attn_impl in ("auto", "varlen", VARLEN_ATTENTION):
        return register_varlen_attention()
    return attn_impl
