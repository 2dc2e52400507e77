"""The one training loop every stage shares (SFT, reward model, DPO; PPO/GRPO later).

A stage (``Stage``) says what an example is, how a micro-batch's loss SUM is computed,
how to evaluate and how to save its model. The loop owns the rest:

    for step in 1..max_steps:
        indices   = the step's ``batch_size`` examples (a seeded permutation per epoch)
        micro     = this rank's share of them (Karmarkar-Karp groups of nearly equal
                    tokens, one per rank) packed into micro-batches of <= micro_batch_tokens
        U         = sum of loss units over ALL ranks' micro-batches (response tokens for
                    SFT, pairs for RM / DPO): the global normaliser
        for mb in micro:  (loss_sum(mb) / U).backward()     # bf16 autocast on CUDA
        (FSDP sums the gradients over ranks: the one-process gradient)
        clip grad norm, AdamW step, LR schedule step
        every log_every: loss, lr, grad norm, tokens/s, MFU, peak memory -> metrics.jsonl
        every eval_every: stage.evaluate();  every save_every: atomic checkpoint

Normalising by U, rather than averaging per-micro-batch means, is what makes the result
independent of how the examples happened to be packed: a micro-batch with more
response tokens weighs more, exactly as in one big batch.

Host syncs: one per optimizer step (loss, grad norm and metric sums fetched together),
which is also where a non-finite loss stops the run, BEFORE the optimizer applies it.
The example order is a pure function of (seed, step), so resuming needs only the step.

Several processes (``torchrun ... -m fastrlhf <stage>``): the module is sharded with FSDP2
before the optimizer is built; every rank runs the same number of forwards (a rank with
fewer micro-batches repeats one with weight 0, since each forward is a collective); eval
runs on every rank alike; rank 0 alone logs, plots and publishes checkpoints, which every
rank writes its shards of (``fastrlhf.checkpoint``: loadable with any world size).
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastrlhf.checkpoint import (
    atomic_write_dir_all_ranks,
    load_checkpoint,
    refuse_stale_checkpoints,
    resume_checkpoint,
    save_checkpoint,
    seed_rank,
)
from fastrlhf.config import OptimConfig, RunConfig, save_config, to_dict
from fastrlhf.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    clip_grad_norm_,
    global_max,
    global_token_count,
    init_distributed,
    rank_micro_batches,
    shard_model,
)
from fastrlhf.metrics import MetricsLogger, plot_metrics, truncate_after


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


class Stage(ABC):
    """What a training stage supplies to ``train``."""

    name: str
    module: torch.nn.Module  # the trained (and checkpointed) module
    ctx: DistContext  # rank, world size, device (``stage_context``)
    device: torch.device
    autocast: bool  # bf16 autocast around forwards (CUDA only)

    @abstractmethod
    def example_lengths(self) -> list[int]:
        """Tokens of every training example (a pair counts both sequences)."""

    @abstractmethod
    def micro_batch(self, indices: list[int]) -> MicroBatch:
        """Collate training examples ``indices`` into one packed micro-batch on the device."""

    @abstractmethod
    def loss_sum(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of the loss over mb's units, {metric: sum over units}); autograd-connected."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (called in eval mode, under no_grad)."""

    @abstractmethod
    def save_model(self, path: Path) -> None:
        """Write the model in HF format to ``path``."""

    def flops_per_token(self) -> float:
        """Training FLOPs per token for the MFU estimate: 6 x matmul parameters."""
        return 6.0 * matmul_params(self.module)

    def finalize(self) -> None:  # noqa: B027 - optional hook, most stages need nothing
        """Called once after the last optimizer step, before the final checkpoint."""

    def forward_context(self):
        if self.autocast and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


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


# ---------------------------------------------------------------------------------------
# optimizer and schedule


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


# ---------------------------------------------------------------------------------------
# data order and packing


def step_indices(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step`` (0-based): epochs of seeded permutations."""
    out = []
    perms: dict[int, torch.Tensor] = {}
    for q in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(q, num_examples)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(num_examples, generator=g)
        out.append(int(perms[epoch][j]))
    return out


def pack_indices(indices: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Split examples into micro-batches of at most ``max_tokens`` tokens (first-fit
    decreasing, fastrlhf.data.packing); an example longer than the budget gets a
    micro-batch of its own rather than an error."""
    from fastrlhf.data.packing import pack_sequences

    fits = [i for i in indices if lengths[i] <= max_tokens]
    too_long = [[i] for i in indices if lengths[i] > max_tokens]
    bins = pack_sequences([lengths[i] for i in fits], max_tokens, algorithm="ffd")
    return [[fits[j] for j in b] for b in bins] + too_long


# ---------------------------------------------------------------------------------------
# the loop


def accumulate_gradients(
    stage: Stage, micro: list[MicroBatch], total_units: int | None = None, padding: int = 0
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


@dataclass
class TrainResult:
    steps: int
    final_dir: Path | None
    eval_metrics: dict[str, float]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available on this machine")
    return dev


def run_context(device: str) -> DistContext:
    """The process context of a run: under torchrun (or in an initialised process group)
    join it, one GPU per process; otherwise one process on ``device``."""
    import torch.distributed as dist

    from fastrlhf.distributed.context import launched_by_torchrun

    if not (launched_by_torchrun() or dist.is_initialized()):
        return DistContext(device=resolve_device(device))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(
            f"device={device!r}: under torchrun every process takes cuda:LOCAL_RANK; "
            "set device to auto, cuda or cpu"
        )
    return init_distributed(device)


def stage_context(cfg: RunConfig, ctx: DistContext | None) -> DistContext:
    """``ctx``, or a single-process context on ``cfg.device`` (stages built directly)."""
    return ctx if ctx is not None else DistContext(device=resolve_device(cfg.device))


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


def progress(items, desc: str, enabled: bool = True):
    """``items`` under a transient progress bar (eval passes, reference passes)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def run_eval(stage: Stage, fn=None) -> Any:
    """``fn`` (default: stage.evaluate) in eval mode under no_grad, then back to train mode."""
    stage.module.eval()
    try:
        with torch.no_grad():
            return (fn or stage.evaluate)()
    finally:
        stage.module.train()


class _Window:
    """Per-step metrics averaged over one logging interval, and its training throughput
    (time inside optimizer steps only: eval and checkpoints do not count)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = self.tokens = 0
        self.seconds = 0.0

    def add(self, values: dict[str, float], tokens: int, seconds: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds

    def row(self) -> dict[str, float]:
        row = {k: v / self.steps for k, v in self.sums.items()}
        row["tokens_per_s"] = self.tokens / max(self.seconds, 1e-9)
        return row


class _NoLogger:
    """What ranks other than 0 log through: nothing."""

    def log(self, step: int, split: str, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_logger(cfg: RunConfig, run_dir: Path, name: str, ctx: DistContext):
    if not ctx.is_main:
        return _NoLogger()
    return MetricsLogger(
        run_dir,
        tensorboard=cfg.logging.tensorboard,
        wandb=cfg.logging.wandb,
        wandb_project=cfg.logging.wandb_project,
        run_name=f"{name}:{run_dir.name}",
        config=to_dict(cfg),
    )


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
    rank's RNG restored). Else clear the run dir's old checkpoints and metrics and give
    ranks > 0 their own random streams (the model init, done before, is the same on all
    ranks): (0, {})."""
    ckpt_root = run_dir / "checkpoints"
    latest = resume_checkpoint(ckpt_root, ctx) if resume else None
    if latest is not None:
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


def _train_step(stage: Stage, groups: list[list[int]], optimizer, scheduler, params, cfg, step):
    """One optimizer step over this rank's micro-batch ``groups``; returns the step's
    metrics (host floats, global over the ranks) and its global token count.

    Host syncs: the global unit and micro-batch counts (only with several processes),
    then loss, grad norm and metric sums fetched together. A non-finite loss or gradient
    norm raises on every rank before the optimizer applies anything."""
    ctx = stage.ctx
    micro = [stage.micro_batch(g) for g in groups]
    local_units = sum(mb.units for mb in micro)
    total_units = global_token_count(local_units, ctx)
    if total_units == 0:
        raise ValueError(
            f"step {step}: the batch has no loss units (no response tokens); check "
            "data.max_length / data.max_prompt_length (truncation may cut every response)"
        )
    padding = global_max(len(micro), ctx) - len(micro)
    loss_total, sums = accumulate_gradients(stage, micro, total_units, padding)
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else math.inf
    grad_norm = clip_grad_norm_(params, max_norm)
    names = list(sums)
    tokens = torch.tensor(float(sum(mb.num_tokens for mb in micro)), device=stage.device)
    local = torch.stack([loss_total, tokens] + [sums[k] for k in names])
    values = torch.cat(
        [all_reduce_sum(local, ctx), grad_norm.to(stage.device).float().reshape(1)]
    ).tolist()
    loss, num_tokens, norm = values[0], values[1], values[-1]
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"[{stage.name}] non-finite loss ({loss}) at step {step}; the optimizer step "
            "was not applied (try a lower optim.lr)"
        )
    if not math.isfinite(norm):
        raise FloatingPointError(
            f"[{stage.name}] non-finite gradient norm ({norm}) at step {step} with loss "
            f"{loss}; the optimizer step was not applied"
        )
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    out = {"loss": loss, "grad_norm": norm, "lr": lr}
    out.update({k: v / total_units for k, v in zip(names, values[2:-1])})
    return out, int(num_tokens)


def _trainer_state(step: int, scheduler, batch_size: int, num_examples: int) -> dict:
    seen = step * batch_size
    return {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "data_position": {
            "examples_seen": seen,
            "epoch": seen // num_examples,
            "index_in_epoch": seen % num_examples,
        },
    }


def train(stage: Stage, cfg: RunConfig, *, resume: bool = False) -> TrainResult:
    """Train ``stage`` for cfg.train.max_steps optimizer steps in cfg.run_dir."""
    ctx = stage.ctx
    tc = cfg.train
    if tc.batch_size < ctx.world_size:
        raise ValueError(
            f"train.batch_size={tc.batch_size} is smaller than the {ctx.world_size} "
            "processes: every rank needs at least one example per step"
        )
    run_dir = prepare_run_dir(cfg, ctx)
    shard_model(stage.module, ctx)  # before the optimizer: sharding replaces the parameters
    stage.module.train()
    optimizer = build_optimizer(stage.module, cfg.optim, stage.device)
    scheduler = build_scheduler(optimizer, cfg.optim, tc.max_steps)
    params = [p for p in stage.module.parameters() if p.requires_grad]
    lengths = stage.example_lengths()
    start, state = restore_or_reset(
        stage.name, stage.module, [optimizer], run_dir, resume, cfg.seed, ctx
    )
    if start:
        scheduler.load_state_dict(state["scheduler"])
    export = exporter({"": stage.module}, stage.save_model, ctx)

    logger = open_logger(cfg, run_dir, stage.name, ctx)
    peak = peak_tflops(stage.device, tc.peak_tflops)
    flops_per_token = stage.flops_per_token()
    window = _Window()
    eval_metrics: dict[str, float] = {}
    bar = _progress(tc.max_steps, start, stage.name, tc.progress_bar and ctx.is_main)
    try:
        for step in range(start + 1, tc.max_steps + 1):
            t0 = time.perf_counter()
            indices = step_indices(step - 1, tc.batch_size, len(lengths), cfg.seed)
            groups = rank_micro_batches(indices, lengths, tc.micro_batch_tokens, ctx)
            # _train_step syncs with the device, so this wall time includes its work
            values, tokens = _train_step(stage, groups, optimizer, scheduler, params, cfg, step)
            window.add(values, tokens, time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            last = step == tc.max_steps
            if step % cfg.logging.log_every == 0 or last:
                row = window.row()
                row["lr"] = values["lr"]  # the latest, not the interval's mean
                if peak > 0:  # the whole job's tokens on all its GPUs' peak
                    row["mfu"] = (
                        flops_per_token * row["tokens_per_s"] / (peak * 1e12 * ctx.world_size)
                    )
                row["peak_mem_gb"] = peak_memory_gb(stage.device)
                logger.log(step, "train", row)
                window = _Window()
            if last:
                run_eval(stage, stage.finalize)
            if (tc.eval_every and step % tc.eval_every == 0) or last:
                eval_metrics = run_eval(stage)
                logger.log(step, "eval", eval_metrics)
                if ctx.is_main:
                    bar.write(f"[{stage.name}] step {step} eval " + _fmt(eval_metrics))
            if (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0) or last:
                save_checkpoint(
                    run_dir / "checkpoints",
                    step,
                    stage.module,
                    [optimizer],
                    _trainer_state(step, scheduler, tc.batch_size, len(lengths)),
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


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
