"""Pure-PyTorch references of ``vocab_kl`` and ``linear_vocab_kl``: full [N, V] logits.

    z, z_r = logits / T, ref_logits / T          # float32 (float64 for float64 inputs)
    "ref||policy": KL(q || p) = sum q (log q - log p),  p = softmax(z), q = softmax(z_r)
    "policy||ref": KL(p || q) = sum p (log p - log q)

``linear_vocab_kl_reference`` first forms each side's logits from its hidden states and
lm_head: raw = h @ W.T + b, s = raw * logit_scale, logits = softcap * tanh(s / softcap)
(when softcap is set), then applies the above. The reference side is detached.

Cost, the reason the fused ops exist: both [N, V] logits are held (twice over in
float32 plus the log-softmaxes), e.g. 5 GB per float32 [N, V] tensor at N = 8192,
V = 151,936.
"""

from __future__ import annotations

import torch

DIRECTIONS = ("ref||policy", "policy||ref")


def vocab_kl_reference(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    temperature: float = 1.0,
    direction: str = "ref||policy",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL [...] in ``max(float32, dtype)``; differentiable in ``logits`` only."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
    acc = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    logq = torch.log_softmax(ref_logits.detach().to(acc) / temperature, dim=-1)
    if direction == "ref||policy":
        kl = (logq.exp() * (logq - logp)).sum(-1)
    else:
        kl = (logp.exp() * (logp - logq)).sum(-1)
    if mask is not None:
        kl = torch.where(mask, kl, torch.zeros_like(kl))
    return kl


def _logits(h, w, b, softcap, logit_scale):
    raw = h @ w.t()
    if b is not None:
        raw = raw + b
    s = raw * logit_scale
    return softcap * torch.tanh(s / softcap) if softcap is not None else s


def linear_vocab_kl_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    direction: str = "ref||policy",
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """Per-token KL [...] from hidden states [..., H] and lm_heads [V, H]; see the module doc."""
    z = _logits(hidden, weight, bias, softcap, logit_scale)
    rb = ref_bias.detach() if ref_bias is not None else None
    z_r = _logits(ref_hidden.detach(), ref_weight.detach(), rb, softcap, logit_scale)
    return vocab_kl_reference(z, z_r, temperature, direction, mask)
