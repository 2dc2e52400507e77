"""Pure-PyTorch references of every fastrlhf op, named ``<op>_reference``.

These are library code, not test copies: the tests compare the fused kernels with
them (in float64), the ops' "reference" backend runs them, and the benchmarks time
them as the "reference" provider. Each carries a comment with the bytes it reads and
writes. Module ``reference/<m>.py`` holds the references of ``fastrlhf/ops/<m>.py``.
"""

from __future__ import annotations

from fastrlhf.ops.reference.advantages import (
    group_advantages_reference,
    masked_whiten_reference,
    packed_gae_reference,
    padded_gae_reference,
)
from fastrlhf.ops.reference.divergence import linear_vocab_kl_reference, vocab_kl_reference
from fastrlhf.ops.reference.linear_logprobs import linear_token_logprobs_reference
from fastrlhf.ops.reference.logprobs import token_logprobs_reference
from fastrlhf.ops.reference.losses import (
    aggregate_reference,
    dpo_loss_reference,
    kl_penalty_reference,
    ppo_policy_loss_reference,
    value_loss_reference,
)

__all__ = [
    "aggregate_reference",
    "dpo_loss_reference",
    "group_advantages_reference",
    "kl_penalty_reference",
    "linear_token_logprobs_reference",
    "linear_vocab_kl_reference",
    "masked_whiten_reference",
    "packed_gae_reference",
    "padded_gae_reference",
    "ppo_policy_loss_reference",
    "token_logprobs_reference",
    "value_loss_reference",
    "vocab_kl_reference",
]
