"""A run directory: its resolved config, a fresh start or a restore from its latest
checkpoint, and how models are exported into it (checkpoints and ``final/``).

    <run_dir>/config.yaml     the resolved RunConfig
    <run_dir>/metrics.jsonl   train / eval rows (``fastrlhf.metrics``)
    <run_dir>/checkpoints/    ``fastrlhf.checkpoint`` directories, the latest resumes
    <run_dir>/final/          the trained model in HF format
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastrlhf.checkpoint import (
    load_checkpoint,
    refuse_stale_checkpoints,
    resume_checkpoint,
    seed_rank,
)
from fastrlhf.config import RunConfig, save_config
from fastrlhf.distributed import DistContext, barrier
from fastrlhf.metrics import truncate_after


def prepare_run_dir(cfg: RunConfig, ctx: DistContext) -> Path:
    """Create the run dir and write the resolved config (rank 0), then sync."""
    run_dir = Path(cfg.run_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    barrier(ctx)
    return run_dir


def restore_or_reset(
    name: str,
    module: torch.nn.Module,
    optimizers: list,
    run_dir: Path,
    resume: bool,
    seed: int,
    ctx: DistContext,
) -> tuple[int, dict]:
    """Load the latest checkpoint when resuming: (its step, its trainer state; every
    rank's RNG restored). Else refuse stale checkpoints, clear old metrics and give
    ranks > 0 their own random streams (the model init, done before, is the same on all
    ranks): (0, {})."""
    ckpt_root = run_dir / "checkpoints"
    latest = resume_checkpoint(ckpt_root, ctx) if resume else None
    if latest is not None:
        # resume_checkpoint verified it (falling back past any that fail)
        state = load_checkpoint(latest, module, optimizers, seed=seed, ctx=ctx, verify=False)
        start = int(state["step"])
        if ctx.is_main:
            truncate_after(run_dir / "metrics.jsonl", start)
            print(f"[{name}] resumed from {latest} (step {start})")
        barrier(ctx)
        return start, state
    if resume and ctx.is_main:
        print(f"[{name}] --resume: no checkpoint in {ckpt_root}, starting fresh")
    # a fresh run owns its run dir: stale checkpoints would outrank (and, when pruning,
    # evict) the new ones; they are never deleted silently (--overwrite does, in the CLI)
    refuse_stale_checkpoints(ckpt_root)
    if ctx.is_main:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    else:
        seed_rank(seed, ctx.rank)
    barrier(ctx)
    return 0, {}


def exporter(models: dict[str, torch.nn.Module], save_model, ctx: DistContext):
    """``export(dir)`` for checkpoints and the final model: ``save_model`` with one
    process, the consolidated FSDP state dicts written by rank 0 with several."""
    if not ctx.distributed:
        return save_model
    from fastrlhf.distributed.checkpoint import write_hf

    return lambda out: write_hf(out, models, ctx)
