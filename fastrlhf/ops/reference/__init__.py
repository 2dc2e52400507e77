"""Pure-PyTorch references of every fastrlhf op.

These are library code, not test copies: the tests compare the fused kernels with
them (in float64), and the benchmarks time them as the "reference" provider. Each
carries a comment with the bytes it reads and writes.
"""

from __future__ import annotations

import importlib

# public name -> submodule of fastrlhf.ops.reference that defines it
_EXPORTS: dict[str, str] = {
    "token_logprobs_reference": "logprobs",
    "kl_penalty_reference": "losses",
    "aggregate_reference": "losses",
    "ppo_policy_loss_reference": "losses",
    "value_loss_reference": "losses",
    "dpo_loss_reference": "losses",
    "packed_gae_reference": "advantages",
    "padded_gae_reference": "advantages",
    "masked_whiten_reference": "advantages",
    "group_advantages_reference": "advantages",
    "linear_token_logprobs_reference": "linear_logprobs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastrlhf.ops.reference' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fastrlhf.ops.reference.{module}"), name)
    globals()[name] = value
    return value
