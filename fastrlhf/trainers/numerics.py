"""The non-finite check every stage runs before an optimizer step is applied.

A NaN or inf loss, gradient norm or metric ends the run (``FloatingPointError``, which
the command line turns into exit status 1) and never reaches the optimizer: the weights,
the optimizer state and every checkpoint stay finite, and the message names the step and
the metric. ``check_finite`` checks host values (the supervised stages fetch theirs once
per step anyway); ``StepGuard`` (the RL update) keeps the check on the device when the
optimizers are fused, so that it costs no host sync.
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


class StepGuard:
    """Keeps non-finite values away from the weights, checked before every optimizer step.

    With fused AdamW optimizers in one process the check stays on the device: a
    non-finite value sets the optimizers' ``found_inf`` flag, so the fused kernel leaves
    weights, moments and step counts untouched, for that step and every later one; the
    run then ends at the next host sync of the metrics (a log row, or before a
    checkpoint), which names the step. Otherwise (foreach / single-tensor AdamW, several
    processes, or a caller that needs the values anyway) the values come to the host in
    one sync and are checked there, before the step.
    """

    def __init__(self, optimizers: list, *, distributed: bool, stage: str) -> None:
        self.optimizers = optimizers
        self.stage = stage
        self.on_device = not distributed and all(o.defaults.get("fused") for o in optimizers)
        self.bad: torch.Tensor | None = None  # device bool: a non-finite value seen so far

    def check(
        self, values: dict[str, torch.Tensor], step: int, *, need_host: bool = False
    ) -> dict[str, float] | None:
        """Call between backward and ``optimizer.step()``; returns the host values when
        they were fetched (``need_host``, or no device-side guard)."""
        if self.on_device and not need_host:
            finite = torch.stack([v.detach().float().reshape(()) for v in values.values()])
            bad = ~finite.isfinite().all()
            self.bad = bad if self.bad is None else self.bad | bad
            skip = self.bad.float()
            for opt in self.optimizers:
                opt.found_inf = skip  # read by the fused AdamW kernel
            return None
        host = fetch(values)
        check_finite(host, stage=self.stage, step=step)
        return host
