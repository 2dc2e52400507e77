"""Post-head logit transforms of HF causal-LM families, read from the model's config.

Some families do more after the lm_head than ``hidden @ W.T + b``: Gemma2/3 soft-cap
the logits (``cap * tanh(z / cap)``), Cohere multiplies them by ``logit_scale``, Granite
divides them by ``logits_scaling``. The trainer applies the lm_head itself (fused
log-prob ops, rollout sampling), so it must apply the same transform, or it trains a
different objective than the model's own forward computes. ``HeadTransform`` is that
transform (scale first, then the cap, as HF orders them); ``head_transform(config)``
reads it through the per-family table below. A family missing from the table is caught
at load by the logit probe (``models.probe``), which compares with HF's own logits.

Table sources (transformers 5.x ``modeling_<family>.py``, the ``ForCausalLM.forward``):
``final_logit_softcapping`` in gemma2, gemma3, gemma3n, gemma4, vaultgemma, nanochat,
beam, inkling2; ``logits * logit_scale`` in cohere, cohere2, cohere2_moe,
cohere_compass; ``logits / logits_scaling`` in the granite families; ``logits *
logits_scaling`` in hyperclovax; ``logits * lm_head_multiplier`` in falcon_h1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadTransform:
    """logits -> softcap * tanh(scale * logits / softcap) (no cap: scale * logits)."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            # the op order of HF's heads: divide, tanh, multiply
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def describe(self) -> str:
        parts = []
        if self.scale != 1.0:
            parts.append(f"logit scale {self.scale:g}")
        if self.softcap is not None:
            parts.append(f"soft-cap {self.softcap:g}")
        return ", ".join(parts) or "none"


def _softcap(cfg) -> HeadTransform:
    cap = getattr(cfg, "final_logit_softcapping", None)
    return HeadTransform(softcap=float(cap) if cap else None)


def _attr_scale(name: str, invert: bool = False) -> Callable:
    def read(cfg) -> HeadTransform:
        value = float(getattr(cfg, name))
        return HeadTransform(scale=1.0 / value if invert else value)

    return read


_SOFTCAP_FAMILIES = (
    "gemma2",
    "gemma3",
    "gemma3_text",
    "gemma3n",
    "gemma3n_text",
    "gemma4",
    "gemma4_text",
    "gemma4_unified",
    "gemma4_unified_text",
    "vaultgemma",
    "nanochat",
    "beam",
    "inkling2",
    "inkling2_text",
)
_GRANITE_FAMILIES = (
    "granite",
    "granite_swa",
    "granitemoe",
    "granitemoe_swa",
    "granitemoehybrid",
    "granitemoeshared",
)
_COHERE_FAMILIES = ("cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text")

# model_type -> reader of the text config
HEAD_TRANSFORMS: dict[str, Callable] = {
    **{t: _softcap for t in _SOFTCAP_FAMILIES},
    **{t: _attr_scale("logit_scale") for t in _COHERE_FAMILIES},
    **{t: _attr_scale("logits_scaling", invert=True) for t in _GRANITE_FAMILIES},
    "hyperclovax": _attr_scale("logits_scaling"),
    "falcon_h1": _attr_scale("lm_head_multiplier"),
}


def head_transform(config) -> HeadTransform:
    """The post-head transform of the family of ``config`` (identity when none is known)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for model_type in (getattr(config, "model_type", None), getattr(text, "model_type", None)):
        if model_type in HEAD_TRANSFORMS:
            return HEAD_TRANSFORMS[model_type](text)
    return HeadTransform()
