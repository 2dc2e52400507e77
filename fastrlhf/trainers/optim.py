"""The optimizer, its learning-rate schedule, and the numbers behind the MFU estimate.

AdamW with weight decay on matrices only; the LR multiplier is a linear warmup then a
cosine / linear decay to ``min_lr_ratio`` (or constant). MFU = training FLOPs per token
(6 x the parameters that take part in a matmul) x tokens/s over the devices' bf16 peak.
"""

from __future__ import annotations

import math
import resource

import torch

from fastrlhf.config import OptimConfig


def matmul_params(module: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: all but untied input embeddings."""
    total = sum(p.numel() for p in module.parameters())
    seen = {id(p) for p in module.parameters()}
    for m in module.modules():
        if isinstance(m, torch.nn.Embedding):
            # a tied embedding is also the lm_head matmul: count it once; untied: not at all
            tied = any(
                isinstance(o, torch.nn.Linear) and o.weight is m.weight for o in module.modules()
            )
            if not tied and id(m.weight) in seen:
                total -= m.weight.numel()
    return total


# bf16 dense peak of common accelerators (TFLOP/s), for the MFU estimate
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40": 181.0,
                "L4": 121.0, "A10": 125.0, "B200": 2250.0}  # fmt: skip


def peak_tflops(device: torch.device, configured: float) -> float:
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(_PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return _PEAK_TFLOPS[key]
    return 0.0


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # CPU: peak resident set size of the process (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build_optimizer(module: torch.nn.Module, cfg: OptimConfig, device: torch.device):
    """AdamW; weight decay only on matrices (not norms or biases); fused on CUDA."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    impl = cfg.impl
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **kwargs,
    )


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR multiplier before optimizer step ``step + 1``: linear warmup, then decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, max_steps)
    )


def mfu(flops_per_token: float, tokens_per_s: float, peak: float, world_size: int) -> float:
    """Model FLOPs utilisation: the whole job's tokens/s on all its devices' peak."""
    return flops_per_token * tokens_per_s / (peak * 1e12 * world_size)
