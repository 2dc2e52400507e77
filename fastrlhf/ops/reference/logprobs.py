"""Pure-PyTorch reference of ``token_logprobs``: log p(label) and entropy of softmax(logits / T).

Shapes: N = tokens (any leading shape flattened), V = vocabulary (logits' last dim).

    u        = logits[..., :vocab_size] * logit_scale            # [..., V']
    u        = softcap * tanh(u / softcap)       (only when softcap is not None)
    z        = u / T
    logp     = z[label] - logsumexp(z)   (0 where label == ignore_index)
    entropy  = logsumexp(z) - sum softmax(z) * z

A label outside [0, V') that is not ignore_index gives NaN at its position (the op
does the same, without reading out of bounds); both take that rule, and the entropy's
p = 0 guard, from ``fastrlhf.ops._labels``. The reference computes in the dtype it is
given after an upcast to at least float32 (tests pass float64 tensors).

Cost (the "reference" benchmark provider, float32 log_softmax + gather): reads the
[N, V] logits once for the upcast, writes a [N, V] float32 copy, reads it and writes
a [N, V] float32 log_softmax, then gathers N values: ~ 2 reads + 2 writes of [N, V]
float32 in the forward, and autograd keeps the [N, V] float32 log_softmax alive for
the backward (which writes another [N, V] float32 and then the [N, V] dlogits).

The post-head transform follows HF's order: the model's own logit scale (Cohere's
``logit_scale``; Granite's 1 / ``logits_scaling``), then Gemma's final soft-cap, both
part of the model's logits; the sampling temperature divides the result.
"""

from __future__ import annotations

import torch

from fastrlhf.ops._labels import entropy_of, label_masks, masked_logp


def head_transform(
    logits: torch.Tensor, softcap: float | None = None, logit_scale: float = 1.0
) -> torch.Tensor:
    """HF's post-head transform: ``logits * logit_scale``, then ``softcap * tanh(z / softcap)``
    (a -inf logit becomes -softcap, as in HF). Returns ``logits`` itself when both are
    the identity."""
    z = logits if logit_scale == 1.0 else logits * logit_scale
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def head_slope(logits: torch.Tensor, softcap: float, logit_scale: float = 1.0) -> torch.Tensor:
    """d head_transform / d logits with a cap: scale * (1 - tanh^2(y)), y = logits * scale /
    softcap, as scale * 4t / (1 + t)^2 with t = e^(-2|y|): no cancellation where tanh
    rounds to +-1 (1 - th^2 would be 0 there). Used by the ops' PyTorch backward paths."""
    t = (logits * (-2.0 * logit_scale / softcap)).abs_().neg_().exp_()  # e^(-2|y|)
    return t.div_((t + 1.0).square_()).mul_(4.0 * logit_scale)


def token_logprobs_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    vocab_size: int | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(labels) (and the entropy) in ``max(float32, logits.dtype)``; differentiable."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    z = head_transform(logits.to(compute), softcap, logit_scale) / temperature  # [..., V]
    logsm = torch.log_softmax(z, dim=-1)  # [..., V]
    ignored, bad, safe = label_masks(labels, ignore_index, logits.shape[-1])
    logp = masked_logp(logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1), ignored, bad)
    if not return_entropy:
        return logp
    return logp, entropy_of(logsm)
