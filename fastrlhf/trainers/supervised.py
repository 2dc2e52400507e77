"""The supervised stages' shared base: SFT, the reward model and DPO.

A supervised stage says what an example is, how a micro-batch's loss SUM is computed, how
to evaluate and how to save its model. ``SupervisedStage.train_step`` does the rest of an
optimizer step:

    indices   = the step's ``batch_size`` examples (a seeded permutation per epoch)
    micro     = this rank's share of them (Karmarkar-Karp groups of nearly equal tokens,
                one per rank) packed into micro-batches of <= micro_batch_tokens
    U         = sum of loss units over ALL ranks' micro-batches (response tokens for
                SFT, pairs for RM / DPO): the global normaliser
    for mb in micro:  (loss_sum(mb) / U).backward()     # bf16 autocast on CUDA
    (FSDP sums the gradients over ranks: the one-process gradient)
    clip grad norm; loss, grad norm and metric sums fetched in ONE host sync; a
    non-finite one raises before the AdamW step (the loop steps the LR schedule)

Normalising by U, rather than averaging per-micro-batch means, is what makes the result
independent of how the examples happened to be packed: a micro-batch with more
response tokens weighs more, exactly as in one big batch. Every rank runs the same
number of forwards (a rank with fewer micro-batches repeats one with weight 0, since
each forward is a collective). The example order is a pure function of (seed, step), so
resuming needs only the step.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from fastrlhf.config import RunConfig
from fastrlhf.distributed import (
    DistContext,
    all_reduce_sum,
    clip_grad_norm_,
    global_max,
    global_token_count,
    rank_micro_batches,
    shard_model,
)
from fastrlhf.trainers.data_order import step_indices
from fastrlhf.trainers.loop import Stage
from fastrlhf.trainers.numerics import check_finite
from fastrlhf.trainers.optim import build_optimizer, build_scheduler, matmul_params
from fastrlhf.trainers.runtime import stage_context


@dataclass
class MicroBatch:
    """A packed micro-batch: ``batch`` (a PackedBatch on the device), the example indices
    it holds, its loss units (tokens or pairs), its token count, and stage-specific
    tensors in ``extra``."""

    batch: Any
    indices: list[int]
    units: int
    num_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


class SupervisedStage(Stage):
    """SFT, RM and DPO: ``example_lengths`` / ``micro_batch`` / ``loss_sum`` define the
    step; the constructor of a subclass loads its model and data, then calls
    ``_setup_training(module)``."""

    def __init__(self, cfg: RunConfig, ctx: DistContext | None) -> None:
        self.cfg = cfg
        self.ctx = stage_context(cfg, ctx)
        self.device = self.ctx.device
        self.bf16 = cfg.train.bf16

    def _setup_training(self, module: torch.nn.Module) -> None:
        """Shard ``module`` (before its optimizer: sharding replaces the parameters) and
        build its optimizer and LR schedule."""
        cfg, ctx = self.cfg, self.ctx
        if cfg.train.batch_size < ctx.world_size:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} is smaller than the "
                f"{ctx.world_size} processes: every rank needs at least one example per step"
            )
        self.module = module
        self.models = {"": module}
        shard_model(module, ctx)
        self.optimizer = build_optimizer(module, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.optimizers, self.schedulers = [self.optimizer], [self.scheduler]
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.lengths = self.example_lengths()

    @abstractmethod
    def example_lengths(self) -> list[int]:
        """Tokens of every training example (a pair counts both sequences)."""

    @abstractmethod
    def micro_batch(self, indices: list[int]) -> MicroBatch:
        """Collate training examples ``indices`` into one packed micro-batch on the device."""

    @abstractmethod
    def loss_sum(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of the loss over mb's units, {metric: sum over units}); autograd-connected."""

    def flops_per_token(self) -> float:
        """Training FLOPs per token for the MFU estimate: 6 x matmul parameters."""
        return 6.0 * matmul_params(self.module)

    def train_step(self, step: int) -> tuple[dict[str, float], int]:
        """One optimizer step; returns the step's metrics (host floats, global over the
        ranks) and its global token count.

        Host syncs: the global unit and micro-batch counts (only with several processes),
        then loss, grad norm and metric sums fetched together. A non-finite value raises
        on every rank before the optimizer applies anything."""
        cfg, ctx = self.cfg, self.ctx
        tc = cfg.train
        indices = step_indices(step - 1, tc.batch_size, len(self.lengths), cfg.seed)
        groups = rank_micro_batches(indices, self.lengths, tc.micro_batch_tokens, ctx)
        micro = [self.micro_batch(g) for g in groups]
        local_units = sum(mb.units for mb in micro)
        total_units = global_token_count(local_units, ctx)
        if total_units == 0:
            raise ValueError(
                f"step {step}: the batch has no loss units (no response tokens); check "
                "data.max_length / data.max_prompt_length (truncation may cut every response)"
            )
        padding = global_max(len(micro), ctx) - len(micro)
        loss_total, sums = accumulate_gradients(self, micro, total_units, padding)
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else math.inf
        grad_norm = clip_grad_norm_(self.params, max_norm)
        names = list(sums)
        tokens = torch.tensor(float(sum(mb.num_tokens for mb in micro)), device=self.device)
        local = torch.stack([loss_total, tokens] + [sums[k] for k in names])
        values = torch.cat(
            [all_reduce_sum(local, ctx), grad_norm.to(self.device).float().reshape(1)]
        ).tolist()
        loss, num_tokens, norm = values[0], values[1], values[-1]
        out = {"loss": loss, "grad_norm": norm, "lr": self.optimizer.param_groups[0]["lr"]}
        out.update({k: v / total_units for k, v in zip(names, values[2:-1])})
        check_finite(out, stage=self.name, step=step)  # before the optimizer applies anything
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out, int(num_tokens)

    def state_dict(self, step: int) -> dict:
        seen = step * self.cfg.train.batch_size
        n = len(self.lengths)
        return {
            "scheduler": self.scheduler.state_dict(),
            "data_position": {
                "examples_seen": seen,
                "epoch": seen // n,
                "index_in_epoch": seen % n,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])


def accumulate_gradients(
    stage: SupervisedStage,
    micro: list[MicroBatch],
    total_units: int | None = None,
    padding: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Backward of sum_m loss_sum(m) / U over this rank's micro-batches, U = ``total_units``
    (all ranks'; default: the units of ``micro``), then ``padding`` zero-weight forwards
    and backwards of ``micro[0]`` so that every rank takes part in as many FSDP
    collectives.

    Returns this rank's share of the step's loss and metric sums (device tensors)."""
    if total_units is None:
        total_units = sum(mb.units for mb in micro)
    loss_total = torch.zeros((), device=stage.device)
    sums: dict[str, torch.Tensor] = {}
    for i, mb in enumerate(micro + micro[:1] * padding):
        weight = 1.0 / total_units if i < len(micro) else 0.0
        with stage.forward_context():
            loss_sum, metric_sums = stage.loss_sum(mb)
        loss = loss_sum.float() * weight
        loss.backward()
        if weight:
            loss_total += loss.detach()
            for k, v in metric_sums.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
    return loss_total, sums
