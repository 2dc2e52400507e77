"""Launch helpers shared by the kernel modules."""

from __future__ import annotations

import contextlib

import torch


def device_of(t: torch.Tensor):
    """Make ``t``'s GPU the current device for a launch.

    Triton launches on the current CUDA device and stream; tensors on another GPU
    (``cuda:1`` while ``cuda:0`` is current) would otherwise be read by a kernel on the
    wrong device (an illegal address or garbage). On CPU (the interpreter) nothing to do.
    """
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)
