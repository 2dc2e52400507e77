"""Models from a RunConfig: the trained policy, frozen models, and the reference-model rule.

The reference of a KL term or of DPO is, by one rule (``load_reference``): none when the
stage does not need one; the policy itself with its LoRA adapter disabled when the
policy has LoRA and no separate reference is named; else a frozen copy loaded from the
named weights or the policy's initial ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fastrlhf.config import ModelConfig, RunConfig

EMBEDDED = "embedded"


def model_path(model: ModelConfig, run_dir: str | Path) -> str:
    """``model.name_or_path``, with "embedded" materialised (once) under the run dir."""
    if model.name_or_path != EMBEDDED:
        return model.name_or_path
    from fastrlhf.checkpoint import atomic_write_dir
    from fastrlhf.data.embedded import embedded_model

    out = Path(run_dir) / "embedded_model"
    if not out.is_dir():  # written atomically: a directory that exists is complete
        atomic_write_dir(out, lambda tmp: embedded_model(tmp, seed=model.embedded_seed))
    return str(out)


def weights_dtype(model: ModelConfig) -> str:
    # "auto": float32 master weights; on CUDA autocast runs the matmuls in bf16
    return "float32" if model.dtype == "auto" else model.dtype


def load_policy_for(cfg: RunConfig, name_or_path: str, device: torch.device, *, trainable: bool):
    """The policy of ``cfg.model`` at ``name_or_path``; a frozen one (no LoRA, no gradient
    checkpointing, eval mode) unless ``trainable``."""
    from fastrlhf.models import load_policy

    m = cfg.model
    policy = load_policy(
        name_or_path,
        dtype=weights_dtype(m),
        device=device,
        trust_remote_code=m.trust_remote_code,
        lora_rank=m.lora_rank if trainable else 0,
        lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
        lora_target_modules=m.lora_target_modules,
        gradient_checkpointing=m.gradient_checkpointing and trainable,
        attn_impl=m.attn_impl,
        attention=m.attention,
        batch_invariant_attention=m.attention_batch_invariant,
        logit_probe=m.logit_probe,
    )
    if policy.tokenizer is None:
        raise ValueError(f"model.name_or_path={name_or_path!r} ships no tokenizer")
    return policy if trainable else frozen(policy)


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_reference(
    cfg: RunConfig,
    policy,
    ref_model: str | None,
    initial: str,
    device: torch.device,
    *,
    needed: bool = True,
):
    """The frozen reference policy, or None: not ``needed``, or a LoRA policy with no
    ``ref_model`` (its adapter-off self is the reference; see ``reference_model``)."""
    if not needed or (policy.has_lora and ref_model is None):
        return None
    return load_policy_for(cfg, ref_model or initial, device, trainable=False)


@contextlib.contextmanager
def reference_model(
    policy, reference, use: Callable[[], contextlib.AbstractContextManager] | None = None
) -> Iterator[torch.nn.Module]:
    """The module whose forward gives reference log-probs: ``reference`` (through
    ``use()``, e.g. a memory manager bringing it to the device), or, when it is None, the
    policy with its LoRA adapter disabled."""
    if reference is None:
        with policy.reference_mode():
            yield policy
    elif use is not None:
        with use() as model:
            yield model
    else:
        yield reference
