"""Pure-PyTorch reference of ``linear_token_logprobs``: the lm_head applied, then log-probs.

Shapes: N = tokens (leading dims of ``hidden`` / ``labels`` flattened), H = hidden size,
V = vocabulary in use (``vocab_size``, default all rows of ``weight``).

    logits  = hidden @ weight[:V].T + bias[:V]       # [N, V], in the inputs' dtype
    z       = float32(logits) / T                     # float64 when the inputs are float64
    logp    = z[label] - logsumexp(z)   (0 where label == ignore_index, NaN if out of range)
    entropy = logsumexp(z) - sum softmax(z) * z       (every row, whatever its label)

This is what an unfused model does (matmul in the model dtype, then a float32
log_softmax and a gather), so at bf16 it is also the "PyTorch at the same dtype" side
of the tests' error bound; given float64 tensors it is the exact reference.

Cost, the reason the fused op exists: the forward reads N*H + V*H inputs and writes the
[N, V] logits in the model dtype, a [N, V] float32 copy and a [N, V] float32 log_softmax
(kept alive for the backward); the backward writes a [N, V] float32 gradient and the
[N, V] dlogits in the model dtype, then reads them for dH and dW. At N = 8192,
V = 151,936 one [N, V] float32 tensor is 5 GB.
"""

from __future__ import annotations

import torch


def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    vocab_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(labels) [...] (and the entropy [...]) in ``max(float32, dtype)``; differentiable."""
    v = weight.shape[0] if vocab_size is None else vocab_size
    logits = hidden @ weight[:v].T  # [..., V]
    if bias is not None:
        logits = logits + bias[:v]
    compute = torch.promote_types(logits.dtype, torch.float32)
    logsm = torch.log_softmax(logits.to(compute) / temperature, dim=-1)  # [..., V]
    ignored = labels == ignore_index
    bad = ~ignored & ((labels < 0) | (labels >= v))
    safe = torch.where(ignored | bad, torch.zeros_like(labels), labels).long()
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [...]
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    logp = torch.where(bad, torch.full_like(logp, float("nan")), logp)
    if not return_entropy:
        return logp
    entropy = -(logsm.exp() * logsm).sum(-1)  # [...]
    return logp, entropy
