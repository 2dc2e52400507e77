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
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fastrlhf.models import attention_paths as paths
from fastrlhf.models.attention_paths import (  # noqa: F401  (the paths, re-exported)
    VarlenMask,
    _flash_varlen,
    eager_document,
    flex_document,
    sdpa_block_mask,
    sdpa_per_sequence,
    torch_varlen,
)

logger = logging.getLogger("fastrlhf.models")

VARLEN_ATTENTION = "fastrlhf_varlen"
ATTENTION_PATHS = ("flash_attn", "torch_varlen", "flex", "sdpa", "eager")
ATTENTION_CHOICES = ("auto", *ATTENTION_PATHS)
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
    query, key, value = _autocast_inputs(choice.path, query, key, value)
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
    elif query.is_cuda or query.shape[2] > paths.MASK_MAX_TOKENS:
        out = sdpa_per_sequence(*args)
    else:
        out = sdpa_block_mask(*args)
    return out, None


def _autocast_inputs(path: str, query, key, value):
    """Under CUDA autocast, fp32 master weights make RoPE hand over fp32 q/k: cast them to
    the autocast dtype for the flash kernels, as autocast does for SDPA itself."""
    if (
        path in ("torch_varlen", "flash_attn", "auto")
        and query.is_cuda
        and query.dtype == torch.float32
        and torch.is_autocast_enabled("cuda")
    ):
        low = torch.get_autocast_dtype("cuda")
        return query.to(low), key.to(low), value.to(low)
    return query, key, value


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
