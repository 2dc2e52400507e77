"""The one training loop every stage runs: SFT, reward model, DPO, PPO and GRPO.

A stage (``Stage``) holds its models, optimizers and schedulers and knows how to take one
training step (``train_step(step)``: an optimizer step of SFT / RM / DPO, one generate ->
score -> update iteration of PPO / GRPO), evaluate, and save its model. ``train`` owns
everything around the steps:

    run dir (config.yaml)  ->  restore the latest checkpoint, or start fresh
    [step 0: eval, the baseline later evals compare with (train.eval_at_start)]
    for step in start+1 .. max_steps:
        metrics = stage.train_step(step);  schedulers step
        every log_every: one host sync for the window's metrics -> one metrics.jsonl row
        every eval_every (and the last step): stage.evaluate()
        every save_every (and the last step): host sync, then an atomic checkpoint
    final/ (the model in HF format), plots

Non-finite values: every stage checks its loss, gradient norms and metrics before its
optimizer step is applied, and a non-finite one never reaches the weights
(``fastrlhf.trainers.numerics``: on the host, or on the device by skipping the fused
optimizer step); the window checks all metrics at its host sync, which comes before
every checkpoint. The run ends with a ``FloatingPointError`` naming the step and the
metric (exit status 1 from the command line), and no checkpoint holds the bad step.

Several processes: every rank runs the loop alike (each step, eval and checkpoint is a
collective); rank 0 alone logs, plots and publishes checkpoints, which every rank writes
its shards of (``fastrlhf.checkpoint``: loadable with any world size).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastrlhf.checkpoint import atomic_write_dir_all_ranks, save_checkpoint
from fastrlhf.config import RunConfig
from fastrlhf.distributed import DistContext
from fastrlhf.metrics import plot_metrics
from fastrlhf.trainers.optim import mfu, peak_memory_gb, peak_tflops
from fastrlhf.trainers.reporting import MetricWindow, fmt, open_logger, progress_bar
from fastrlhf.trainers.run_dir import exporter, prepare_run_dir, restore_or_reset
from fastrlhf.trainers.runtime import forward_context


class Stage(ABC):
    """What a training stage gives ``train``.

    Attributes (set by the stage's constructor, after sharding its trained models):
    ``module`` (everything a checkpoint's weights hold), ``models`` (what an export
    writes: "" the model the next stage loads, e.g. "critic" beside it), ``optimizers``
    and ``schedulers`` (each scheduler is stepped once per ``train_step``).
    """

    name: str
    ctx: DistContext
    device: torch.device
    bf16: bool  # bf16 autocast around forwards (CUDA only)
    module: torch.nn.Module
    models: dict[str, torch.nn.Module]
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[Any]
    # default of train.eval_at_start (RL stages: their starting reward is the baseline)
    eval_at_start: bool = False
    progress_metric: str = "loss"  # shown on the progress bar

    @abstractmethod
    def train_step(self, step: int) -> tuple[dict[str, torch.Tensor | float], int]:
        """Train step ``step`` (1-based), with no non-finite value reaching the weights.

        Returns (metrics: host floats or 0-dim device tensors, tokens trained on: the
        throughput and MFU, 0 for none)."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (called in eval mode, under no_grad)."""

    @abstractmethod
    def save_model(self, path: Path) -> None:
        """Write the model(s) in HF format to ``path`` (one process)."""

    @abstractmethod
    def state_dict(self, step: int) -> dict:
        """What a checkpoint holds beside weights, optimizer and RNG states after ``step``:
        schedulers, data position, stage state (tensors, numbers and strings only)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved."""

    def flops_per_token(self) -> float:
        """Training FLOPs per token for the MFU estimate (0: not logged)."""
        return 0.0

    def finalize(self) -> None:  # noqa: B027 - optional hook, most stages need nothing
        """Called once after the last training step, before the final eval and checkpoint."""

    def forward_context(self):
        return forward_context(self.device, self.bf16)


@dataclass
class TrainResult:
    steps: int
    final_dir: Path | None
    eval_metrics: dict[str, float]


def run_eval(stage: Stage, fn=None) -> Any:
    """``fn`` (default: stage.evaluate) in eval mode under no_grad, then back to train mode."""
    stage.module.eval()
    try:
        with torch.no_grad():
            return (fn or stage.evaluate)()
    finally:
        stage.module.train()


def _every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


def train(stage: Stage, cfg: RunConfig, *, resume: bool = False) -> TrainResult:
    """Train ``stage`` for cfg.train.max_steps steps in cfg.run_dir."""
    ctx, tc = stage.ctx, cfg.train
    run_dir = prepare_run_dir(cfg, ctx)
    stage.module.train()
    start, state = restore_or_reset(
        stage.name, stage.module, stage.optimizers, run_dir, resume, cfg.seed, ctx
    )
    if start:
        stage.load_state_dict(state)
    export = exporter(stage.models, stage.save_model, ctx)
    logger = open_logger(cfg, run_dir, stage.name, ctx)
    peak = peak_tflops(stage.device, tc.peak_tflops)
    flops_per_token = stage.flops_per_token()
    at_start = tc.eval_at_start if tc.eval_at_start is not None else stage.eval_at_start
    window = MetricWindow(stage.name)
    eval_metrics: dict[str, float] = {}
    bar = progress_bar(tc.max_steps, start, stage.name, tc.progress_bar and ctx.is_main)

    def evaluate(step: int) -> dict[str, float]:
        metrics = run_eval(stage)
        logger.log(step, "eval", metrics)
        if ctx.is_main:
            bar.write(f"[{stage.name}] step {step} eval " + fmt(metrics))
        return metrics

    try:
        if start == 0 and at_start and (tc.eval_every or tc.eval_at_start):
            eval_metrics = evaluate(0)
        for step in range(start + 1, tc.max_steps + 1):
            t0 = time.perf_counter()
            values, tokens = stage.train_step(step)
            for scheduler in stage.schedulers:
                scheduler.step()
            window.add(step, values, tokens, time.perf_counter() - t0)
            bar.update(1)
            shown = values.get(stage.progress_metric)
            if isinstance(shown, float):
                bar.set_postfix({stage.progress_metric: f"{shown:.4f}"})
            last = step == tc.max_steps
            if _every(cfg.logging.log_every, step) or last:
                row = window.row()  # the window's one host sync
                if peak > 0 and "tokens_per_s" in row and flops_per_token:
                    row["mfu"] = mfu(flops_per_token, row["tokens_per_s"], peak, ctx.world_size)
                row["peak_mem_gb"] = peak_memory_gb(stage.device)
                logger.log(step, "train", row)
                if stage.progress_metric in row:
                    bar.set_postfix({stage.progress_metric: f"{row[stage.progress_metric]:.4f}"})
                window = MetricWindow(stage.name)
            if last:
                run_eval(stage, stage.finalize)
            if _every(tc.eval_every, step) or last:
                eval_metrics = evaluate(step)
            if _every(cfg.checkpoint.save_every, step) or last:
                window.fetch()  # nothing non-finite goes into a checkpoint
                save_checkpoint(
                    run_dir / "checkpoints",
                    step,
                    stage.module,
                    stage.optimizers,
                    {"step": step, **stage.state_dict(step)},
                    export=export,
                    keep_last=cfg.checkpoint.keep_last,
                    ctx=ctx,
                )
    finally:
        bar.close()
        logger.close()

    if start >= tc.max_steps:  # resumed a finished run: nothing trained, evaluate again
        run_eval(stage, stage.finalize)
        eval_metrics = run_eval(stage)
    final_dir = None
    if cfg.checkpoint.save_final:
        final_dir = atomic_write_dir_all_ranks(run_dir / "final", export, ctx)
    if cfg.logging.plots and ctx.is_main:
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "plots", title=stage.name)
    return TrainResult(steps=tc.max_steps, final_dir=final_dir, eval_metrics=eval_metrics)
