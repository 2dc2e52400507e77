"""Pure-PyTorch references of every fastrlhf op.

These are library code, not test copies: the tests compare the fused kernels with
them (in float64), and the benchmarks time them as the "reference" provider. Each
carries a comment with the bytes it reads and writes.
"""

from __future__ import annotations

import importlib

# public name -> submodule of fastrlhf.ops.reference that defines it
_EXPORTS: dict[str, str] = {}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastrlhf.ops.reference' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fastrlhf.ops.reference.{module}"), name)
    globals()[name] = value
    return value
