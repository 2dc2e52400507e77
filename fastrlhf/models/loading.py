"""Loading HF decoder checkpoints and running them on packed (padding-free) batches.

``packed_hidden`` is the one place a decoder backbone is called: it takes the packed
row (input_ids [N], position_ids [N], cu_seqlens [B+1], max_seqlen) and returns the
final, post-norm hidden states [N, H] without touching the lm_head.

Legend: N = packed tokens, B = sequences, H = hidden size.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastrlhf.models.attention import (
    CURRENT_MASK,
    VARLEN_ATTENTION,
    VarlenMask,
    attention_choice,
    configure_attention,
    resolve_attn_impl,
)

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """None -> bf16 on CUDA, fp32 elsewhere; strings like "bf16" / "float32" accepted."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("auto", "none"):
        return resolve_dtype(None, device)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, or None when it ships none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None


def tokenizer_vocab_size(tokenizer, config) -> int:
    """Rows of the lm_head that are real tokens: len(tokenizer), capped by the config's vocab."""
    if tokenizer is None:
        return int(config.vocab_size)
    return min(len(tokenizer), int(config.vocab_size))


def is_adapter_dir(name_or_path: str | os.PathLike) -> bool:
    return (Path(name_or_path) / "adapter_config.json").is_file()


def check_packed_inputs(
    input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor
) -> None:
    """Shapes and dtypes only: checking the values would sync the device."""
    if input_ids.ndim != 1 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"input_ids must be a 1-D integer tensor [N], got shape {tuple(input_ids.shape)} "
            f"dtype {input_ids.dtype}"
        )
    if position_ids.shape != input_ids.shape:
        raise ValueError(
            f"position_ids must have input_ids' shape {tuple(input_ids.shape)}, got "
            f"{tuple(position_ids.shape)}"
        )
    if cu_seqlens.ndim != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor [B+1] with B >= 1, got shape "
            f"{tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}"
        )
    if cu_seqlens.device != input_ids.device or position_ids.device != input_ids.device:
        raise ValueError(
            f"input_ids ({input_ids.device}), position_ids ({position_ids.device}) and "
            f"cu_seqlens ({cu_seqlens.device}) must be on the same device"
        )


def packed_hidden(
    decoder: torch.nn.Module,
    input_ids: torch.Tensor,  # [N]
    position_ids: torch.Tensor,  # [N]
    cu_seqlens: torch.Tensor,  # [B+1] int32
    max_seqlen: int,
) -> torch.Tensor:
    """Final (post-norm) hidden states [N, H] of a decoder backbone on one packed row."""
    check_packed_inputs(input_ids, position_ids, cu_seqlens)
    impl = decoder.config._attn_implementation
    kwargs: dict = {}
    if impl == VARLEN_ATTENTION:
        # one mask object per forward, shared (and its masks cached) across layers
        kwargs["varlen_mask"] = VarlenMask(
            cu_seqlens, int(max_seqlen), choice=attention_choice(decoder)
        )
    elif impl is not None and impl.startswith("flash_attention"):
        # transformers' own flash path reads these names
        kwargs.update(
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=int(max_seqlen),
            max_length_k=int(max_seqlen),
        )
    # sdpa / eager: transformers detects the packing from position_ids restarting at 0
    token = CURRENT_MASK.set(kwargs.get("varlen_mask"))
    try:
        out = decoder(
            input_ids=input_ids[None].long(),  # [1, N]
            position_ids=position_ids[None].long(),  # [1, N]
            use_cache=False,
            **kwargs,
        )
    finally:
        CURRENT_MASK.reset(token)
    return out.last_hidden_state[0]  # [N, H]


def load_backbone(
    name_or_path: str,
    *,
    causal_lm: bool,
    dtype: torch.dtype,
    device: torch.device | str,
    trust_remote_code: bool,
    attn_impl: str,
    attention: str = "auto",
    batch_invariant_attention: bool = False,
):
    """``AutoModelForCausalLM`` (causal_lm=True) or ``AutoModel`` from a checkpoint."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal_lm else AutoModel
    check_model_source(name_or_path)
    try:
        model = cls.from_pretrained(
            name_or_path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=resolve_attn_impl(attn_impl),
        )
    except (OSError, ValueError, KeyError) as e:  # transformers' not-found / bad-config errors
        raise model_error(name_or_path, e) from e
    model.config.use_cache = False  # training forward; generation passes use_cache itself
    return setup_attention(model.to(device), attention, batch_invariant_attention)


def setup_attention(model, attention: str = "auto", batch_invariant: bool = False):
    """Pick the packed-attention path of ``model`` (see models.attention); ``attention``
    other than "auto" needs our packed attention (attn_impl "auto")."""
    if model.config._attn_implementation == VARLEN_ATTENTION:
        configure_attention(model, attention, batch_invariant=batch_invariant)
    elif attention != "auto":
        raise ValueError(
            f"model.attention={attention!r} selects a path of fastrlhf's packed attention, "
            f"but attn_impl={model.config._attn_implementation!r} hands attention to "
            "transformers; set attn_impl=auto"
        )
    return model


def check_model_source(name_or_path: str) -> None:
    """A path that is clearly local (starts with / . ~, or has more than one "/") must be
    a directory: otherwise transformers tries it as a hub id and says so misleadingly."""
    p = str(name_or_path)
    local = p.startswith(("/", ".", "~")) or p.count("/") > 1 or Path(p).exists()
    if local and not Path(p).expanduser().is_dir():
        from fastrlhf.errors import ModelError

        raise ModelError(f"model.name_or_path={p}: no such model directory")


def model_error(name_or_path: str, e: Exception):
    """A one-line ``ModelError`` for a model that failed to load (names the path/id)."""
    from fastrlhf.errors import ModelError

    first = (str(e).strip().splitlines() or [""])[0][:300]
    if Path(name_or_path).expanduser().is_dir():
        return ModelError(
            f"model.name_or_path={name_or_path}: cannot load the model in this directory "
            f"({type(e).__name__}: {first})"
        )
    return ModelError(
        f"model.name_or_path={name_or_path!r}: not a local directory, and loading it from "
        f"the hub failed (offline or unknown id? {type(e).__name__}: {first})"
    )


def enable_gradient_checkpointing(model) -> None:
    # non-reentrant checkpointing: works with frozen inputs (LoRA) and with kwargs
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
