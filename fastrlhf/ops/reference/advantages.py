"""Reference implementations of the advantage estimators in ``fastrlhf.ops.advantages``.

Shapes: N = packed tokens, B = sequences, T = padded length, G = groups.

- ``packed_gae_reference``: GAE over packed sequences, a plain Python loop in float64
  over every token. The ground truth of the tests; slow (about a microsecond per
  token), so benchmarks time it on a subset.
- ``padded_gae_reference``: the loop every RLHF trainer runs, a reverse loop over the T
  time steps of padded [B, T] tensors in torch (one handful of kernels per step). It
  is ``packed_gae(impl="torch")`` and the "padded loop" benchmark provider.
- ``masked_whiten_reference``, ``group_advantages_reference``: Python loops over the
  elements, in float64.

Masking rule of GAE (as in verl's ``compute_gae_advantage_return`` with a response
mask): a masked token is skipped. The running (next value, advantage) pair is
carried across it unchanged, so the nearest unmasked token to its left bootstraps
from the nearest unmasked token to its right; its own reward is dropped; its
advantage is 0 (verl instead repeats the carried advantage there, which its
masked whitening then ignores). ``returns = advantages + values`` everywhere.
"""

from __future__ import annotations

import math

import torch


def packed_gae_reference(
    rewards: torch.Tensor,
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    mask: torch.Tensor | None = None,
    bootstrap: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], returns [N]) in float64, by a Python loop over tokens.

    Cost: reads 2N + B floats (+ N mask), writes 2N; about 1 µs per token in Python.
    """
    r = rewards.double().tolist()
    v = values.double().tolist()
    m = [True] * len(r) if mask is None else mask.bool().tolist()
    cu = cu_seqlens.tolist()
    boot = [0.0] * (len(cu) - 1) if bootstrap is None else bootstrap.double().tolist()
    adv = [0.0] * len(r)
    for b in range(len(cu) - 1):
        next_value, running = boot[b], 0.0
        for t in range(cu[b + 1] - 1, cu[b] - 1, -1):
            if not m[t]:
                continue  # carried across; adv[t] stays 0
            running = r[t] + gamma * next_value - v[t] + gamma * lam * running
            next_value = v[t]
            adv[t] = running
    adv_t = torch.tensor(adv, dtype=torch.float64)
    return adv_t, adv_t + values.double().cpu()


def padded_gae_reference(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    bootstrap: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B, T], returns [B, T]) by a reverse torch loop over T steps.

    ``rewards``, ``values``, ``mask`` are [B, T]; sequences sit at the left of their row
    and the padding to their right must be masked out (it then carries the terminal
    state, bootstrap or 0, unchanged). Computes in float32 unless the input is float64.
    Cost: each of the T steps launches ~10 small kernels on [B] vectors; reads 3BT,
    writes 2BT elements in total.
    """
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r, v = rewards.to(dtype), values.to(dtype)  # [B, T]
    m = mask.bool()  # [B, T]
    batch, steps = r.shape
    next_value = (
        torch.zeros(batch, dtype=dtype, device=r.device)
        if bootstrap is None
        else bootstrap.to(device=r.device, dtype=dtype)
    )  # [B]
    running = torch.zeros(batch, dtype=dtype, device=r.device)  # [B]
    adv = torch.zeros_like(r)  # [B, T]
    for t in range(steps - 1, -1, -1):
        here = m[:, t]  # [B]
        step = r[:, t] + gamma * next_value - v[:, t] + gamma * lam * running
        # masked steps carry the pair (verl's rule); torch.where, not verl's
        # m*x + (1-m)*y, so that a NaN or inf in a padded slot cannot leak through 0*x
        next_value = torch.where(here, v[:, t], next_value)
        running = torch.where(here, step, running)
        adv[:, t] = torch.where(here, step, 0.0)
    return adv, adv + v


def masked_whiten_reference(
    x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True
) -> torch.Tensor:
    """Global masked whitening in float64 by Python loops; see ``ops.masked_whiten``."""
    xs = x.double().flatten().tolist()
    ms = [True] * len(xs) if mask is None else mask.bool().flatten().tolist()
    picked = [a for a, keep in zip(xs, ms) if keep]
    n = len(picked)
    mean = sum(picked) / n if n else 0.0
    var = sum((a - mean) ** 2 for a in picked) / (n - 1) if n > 1 else 0.0
    scale = 1.0 / math.sqrt(var + 1e-8) if n > 1 else 1.0
    out = [(a - mean) * scale + (0.0 if shift_mean else mean) for a in xs]
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


def group_advantages_reference(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    kind: str = "grpo",
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-sequence advantages [B] in float64 for kind "grpo" or "rloo", by loops.

    GRPO: (s - mean_g) / (std_g + eps), std unbiased, std of a one-member group 0;
    without ``normalize_std`` just s - mean_g (Dr. GRPO). RLOO: s - mean of the other
    members of the group; 0 for a one-member group.
    """
    s = scores.double().tolist()
    g = group_ids.tolist()
    members: dict[int, list[int]] = {}
    for i, gid in enumerate(g):
        members.setdefault(gid, []).append(i)
    out = [0.0] * len(s)
    for idx in members.values():
        vals = [s[i] for i in idx]
        n = len(vals)
        mean = sum(vals) / n
        for i in idx:
            if kind == "grpo":
                if normalize_std:
                    std = math.sqrt(sum((a - mean) ** 2 for a in vals) / (n - 1)) if n > 1 else 0.0
                    out[i] = (s[i] - mean) / (std + eps)
                else:
                    out[i] = s[i] - mean
            elif kind == "rloo":
                out[i] = s[i] - (sum(vals) - s[i]) / (n - 1) if n > 1 else 0.0
            else:
                raise ValueError(f"unknown kind {kind!r}")
    return torch.tensor(out, dtype=torch.float64)
