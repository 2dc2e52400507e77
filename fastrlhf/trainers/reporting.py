"""What a run reports: the metrics logger, progress bars, and the window of per-step
metrics that one logging row averages.

Per-step metrics may be host floats or device tensors; a window fetches all of its
tensors in one host sync (``MetricWindow.fetch``), at a logging step or before a
checkpoint, and checks them for non-finite values there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastrlhf.config import RunConfig, to_dict
from fastrlhf.distributed import DistContext
from fastrlhf.metrics import MetricsLogger
from fastrlhf.trainers.numerics import check_finite


class NoLogger:
    """What ranks other than 0 log through: nothing."""

    def log(self, step: int, split: str, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_logger(cfg: RunConfig, run_dir: Path, name: str, ctx: DistContext):
    if not ctx.is_main:
        return NoLogger()
    return MetricsLogger(
        run_dir,
        tensorboard=cfg.logging.tensorboard,
        wandb=cfg.logging.wandb,
        wandb_project=cfg.logging.wandb_project,
        run_name=f"{name}:{run_dir.name}",
        config=to_dict(cfg),
    )


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


def progress(items, desc: str, enabled: bool = True):
    """``items`` under a transient progress bar (eval passes, reference passes)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


class MetricWindow:
    """The per-step metrics of one logging interval and its training throughput (time
    inside training steps only: eval and checkpoints do not count).

    A row averages each metric over the steps that reported it, except ``lr`` (the
    latest) and ``memory/*`` (the peak)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.steps: list[tuple[int, dict[str, torch.Tensor | float]]] = []
        self.tokens = 0
        self.seconds = 0.0
        self._fetched = 0  # steps[:_fetched] hold host floats only

    def add(self, step: int, values: dict, tokens: int, seconds: float) -> None:
        self.steps.append((step, values))
        self.tokens += tokens
        self.seconds += seconds

    def fetch(self) -> None:
        """Device tensors -> host floats in one sync, then the non-finite check of every
        step's values (naming the step and the metric)."""
        pending = self.steps[self._fetched :]
        tensors = [v for _, m in pending for v in m.values() if isinstance(v, torch.Tensor)]
        if tensors:
            device = tensors[0].device
            flat = torch.stack([t.detach().float().reshape(()).to(device) for t in tensors])
            host = iter(flat.tolist())
            for _, m in pending:
                for k, v in m.items():
                    if isinstance(v, torch.Tensor):
                        m[k] = next(host)
        for step, m in pending:
            check_finite(m, stage=self.stage, step=step)
        self._fetched = len(self.steps)

    def row(self) -> dict[str, float]:
        self.fetch()
        keys: dict[str, None] = {}
        for _, m in self.steps:
            keys.update(dict.fromkeys(m))
        row = {}
        for k in keys:
            vals = [m[k] for _, m in self.steps if k in m]
            if k == "lr":
                row[k] = vals[-1]
            elif k.startswith("memory/"):
                row[k] = max(vals)
            else:
                row[k] = sum(vals) / len(vals)
        if self.tokens:
            row["tokens_per_s"] = self.tokens / max(self.seconds, 1e-9)
        return row
