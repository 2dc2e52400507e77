"""Pure-PyTorch reference of ``linear_token_logprobs``: the lm_head applied, then log-probs.

Shapes: N = tokens (leading dims of ``hidden`` / ``labels`` flattened), H = hidden size,
V = vocabulary in use (``vocab_size``, default all rows of ``weight``).

    logits  = hidden @ weight[:V].T + bias[:V]       # [N, V], in the inputs' dtype
    z       = head_transform(float32(logits)) / T     # float64 when the inputs are float64
              (scale, then soft-cap: see reference.logprobs.head_transform)
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

from fastrlhf.ops.reference.logprobs import token_logprobs_reference


def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    vocab_size: int | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(labels) [...] (and the entropy [...]) in ``max(float32, dtype)``; differentiable.

    The lm_head in the inputs' dtype, then ``token_logprobs_reference`` on its logits.
    """
    v = weight.shape[0] if vocab_size is None else vocab_size
    logits = hidden @ weight[:v].T  # [..., V]
    if bias is not None:
        logits = logits + bias[:v]
    return token_logprobs_reference(
        logits, labels, temperature, ignore_index, return_entropy,
        softcap=softcap, logit_scale=logit_scale,
    )  # fmt: skip
