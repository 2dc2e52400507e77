"""Trainers: one file per stage on top of one shared loop (``loop.py``).

See README.md's layout section for what each module holds.

``run_stage(cfg, resume=False)`` dispatches on ``cfg.stage``. Stage modules are imported
on demand, so ``import fastrlhf.trainers`` pulls in neither transformers nor triton.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fastrlhf.config.schema import RL_STAGES
from fastrlhf.config.schema import STAGES as STAGE_NAMES

if TYPE_CHECKING:  # pragma: no cover
    from fastrlhf.config import RunConfig
    from fastrlhf.trainers.loop import TrainResult

# stage name -> module with ``run(cfg, *, resume) -> TrainResult``: a stage's own module,
# the RL stages share theirs
STAGES: dict[str, str] = {
    s: f"fastrlhf.trainers.{'ppo' if s in RL_STAGES else s}" for s in STAGE_NAMES
}


def set_cpu_threads(n: int) -> None:
    """torch intra-op threads (0: leave torch's default)."""
    if n > 0:
        import torch

        torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's and numpy's global generators."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the legacy global generator others may use
    torch.manual_seed(seed)


def run_stage(cfg: RunConfig, *, resume: bool = False) -> TrainResult:
    """Train ``cfg.stage`` with ``cfg``; ``resume`` continues from the latest checkpoint.

    Under torchrun every process calls this: it joins the process group (one GPU per
    process), builds the embedded model on rank 0 first, trains, and leaves the group."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage={cfg.stage!r} is not one of {sorted(STAGES)}")
    from fastrlhf.distributed import main_process_first, teardown
    from fastrlhf.trainers.loading import model_path
    from fastrlhf.trainers.runtime import run_context

    set_cpu_threads(cfg.train.cpu_threads)
    ctx = run_context(cfg.device)
    try:
        with main_process_first(ctx):  # materialise the embedded model once
            model_path(cfg.model, cfg.run_dir)
        seed_everything(cfg.seed)  # the same model init (LoRA, heads) on every rank
        stage = importlib.import_module(STAGES[cfg.stage])
        result = stage.run(cfg, resume=resume, ctx=ctx)
    except BaseException:
        # no barrier: the other ranks may be inside a collective this one will never join;
        # torchrun stops them when this process exits with an error
        _leave_group(ctx)
        raise
    teardown(ctx)
    return result


def _leave_group(ctx) -> None:
    import torch.distributed as dist

    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
