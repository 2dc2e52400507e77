"""fastrlhf.ops: the public drop-in API. It depends on torch and triton only.

Each op has a pure-PyTorch reference in ``fastrlhf.ops.reference`` (``<op>_reference``
in ``reference/<module>.py``), a fused kernel (Triton in ``fastrlhf.kernels`` or C++/CUDA
in ``fastrlhf._C``), a backward, and a path that runs on a machine without a GPU. The
fused ops are defined through ``ops._library.fused_op`` and pick their backend with
``impl=`` ("auto", "triton" or "extension", "torch", "reference").

Names are resolved lazily (PEP 562) so that ``import fastrlhf.ops`` stays cheap and
does not import triton until an op that needs it is used.
"""

from __future__ import annotations

import importlib

# public name -> submodule of fastrlhf.ops that defines it
_EXPORTS: dict[str, str] = {
    "token_logprobs": "logprobs",
    "kl_penalty": "losses",
    "ppo_policy_loss": "losses",
    "value_loss": "losses",
    "dpo_loss": "losses",
    "packed_gae": "advantages",
    "masked_whiten": "advantages",
    "pack_padded": "advantages",
    "unpack_to_padded": "advantages",
    "group_advantages": "advantages",
    "linear_token_logprobs": "linear_logprobs",
    "vocab_kl": "divergence",
    "linear_vocab_kl": "divergence",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastrlhf.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fastrlhf.ops.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
