"""Where a stage runs: its device, its process group, and the autocast around forwards.

One process: a ``DistContext`` on ``cfg.device``. Under torchrun (or in an initialised
process group) every process joins the group and takes cuda:LOCAL_RANK.
"""

from __future__ import annotations

import contextlib

import torch

from fastrlhf.config import RunConfig
from fastrlhf.distributed import DistContext, init_distributed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available on this machine")
    return dev


def run_context(device: str) -> DistContext:
    """The process context of a run: under torchrun (or in an initialised process group)
    join it, one GPU per process; otherwise one process on ``device``."""
    import torch.distributed as dist

    from fastrlhf.distributed.context import launched_by_torchrun

    if not (launched_by_torchrun() or dist.is_initialized()):
        return DistContext(device=resolve_device(device))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(
            f"device={device!r}: under torchrun every process takes cuda:LOCAL_RANK; "
            "set device to auto, cuda or cpu"
        )
    return init_distributed(device)


def stage_context(cfg: RunConfig, ctx: DistContext | None) -> DistContext:
    """``ctx``, or a single-process context on ``cfg.device`` (stages built directly)."""
    return ctx if ctx is not None else DistContext(device=resolve_device(cfg.device))


def forward_context(device: torch.device, bf16: bool):
    """bf16 autocast around forwards on CUDA when ``train.bf16``; nothing elsewhere (fp32
    master weights stay fp32 on the CPU)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
