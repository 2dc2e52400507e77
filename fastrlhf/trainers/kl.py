"""KL controllers: the coefficient beta of the KL penalty (in the reward or in the loss).

- ``FixedKLController``: beta never changes;
- ``AdaptiveKLController`` (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
  Preferences", section 2.2): after a rollout with measured KL ``kl`` over ``n`` samples,

      e    = clip(kl / target - 1, -0.2, 0.2)
      beta = beta * (1 + e * n / horizon)

  so beta grows while the policy drifts further than ``target`` nats from the reference
  and shrinks while it stays closer. ``update`` accepts a 0-dim tensor and keeps beta on
  its device: the trainer can adapt beta every rollout without a host sync.
"""

from __future__ import annotations

import torch


class FixedKLController:
    """beta stays at its initial value."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"kl coef must be >= 0; got {coef}")
        self.value: float | torch.Tensor = float(coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller (see the module docstring)."""

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if init_coef < 0:
            raise ValueError(f"kl coef must be >= 0; got {init_coef}")
        if not target > 0:
            raise ValueError(f"adaptive KL target must be > 0; got {target}")
        if not horizon > 0:
            raise ValueError(f"adaptive KL horizon must be > 0; got {horizon}")
        self.value: float | torch.Tensor = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """One controller step after a rollout of ``n_steps`` samples with KL ``current_kl``.

        A tensor ``current_kl`` keeps beta a 0-dim tensor on its device (no host sync).
        """
        if isinstance(current_kl, torch.Tensor):
            error = (current_kl.float() / self.target - 1.0).clamp(-0.2, 0.2)
            value = self.value
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value, dtype=torch.float32, device=current_kl.device)
            self.value = value * (1.0 + error * n_steps / self.horizon)
        else:
            error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
            self.value = float(self.value) * (1.0 + error * n_steps / self.horizon)

    def state_dict(self) -> dict:
        return {"value": float(self.value), "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def kl_controller(
    coef: float, *, adaptive: bool = False, target: float = 6.0, horizon: int = 10000
) -> FixedKLController | AdaptiveKLController:
    return AdaptiveKLController(coef, target, horizon) if adaptive else FixedKLController(coef)
