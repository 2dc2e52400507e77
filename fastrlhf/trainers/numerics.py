"""The non-finite check every stage runs before an optimizer step is applied.

A NaN or inf loss, gradient norm or metric ends the run (``FloatingPointError``, which
the command line turns into exit status 1) BEFORE the optimizer applies the step: the
weights, the optimizer state and every checkpoint written so far stay finite, and the
message names the step and the metric.
"""

from __future__ import annotations

import math

import torch

# reported first when several values are non-finite: the loss is the cause, the rest
# (gradient norm, approximate KL, ...) follow from it
_LOSSES = ("loss", "policy_loss", "value_loss")


def fetch(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Host floats of ``values`` in one transfer (a single host sync for device tensors)."""
    names = list(values)
    if not names:
        return {}
    device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), None)
    stacked = torch.stack(
        [torch.as_tensor(values[k], device=device).detach().float().reshape(()) for k in names]
    )
    return dict(zip(names, stacked.tolist()))


def check_finite(values: dict[str, float], *, stage: str, step: int) -> None:
    """Raise FloatingPointError naming ``step`` and the first non-finite value (losses
    first) of ``values``; the caller has not applied the optimizer step yet."""
    order = [k for k in _LOSSES if k in values] + [k for k in values if k not in _LOSSES]
    for name in order:
        if not math.isfinite(values[name]):
            raise FloatingPointError(
                f"[{stage}] non-finite {name} ({values[name]}) at step {step}; the optimizer "
                "step was not applied and no checkpoint holds it (try a lower optim.lr)"
            )
