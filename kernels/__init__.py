"""Triton kernels and their launchers, installed as ``fastrlhf.kernels``.

Nothing here is imported by ``import fastrlhf``; ``fastrlhf.ops`` imports a kernel
module the first time an op needs it.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton kernels run through its CPU interpreter (TRITON_INTERPRET=1).

    Read from the environment, as Triton does when it is first imported (which is why the
    variable must be set before that); checking does not import triton.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
