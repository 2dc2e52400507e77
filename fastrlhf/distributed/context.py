"""The process context of a data-parallel run, and the few collectives the trainers need.

``init_distributed()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and joins the process group: NCCL with one GPU per process
(``cuda:LOCAL_RANK``) on CUDA, gloo on CPU. Launched without torchrun it returns a
single-process context in which every helper below is the identity, so a trainer calls
them unconditionally.

Data parallelism, as data:

    micro-batches of a step      pack_sequences(..., "kk", num_ranks=R): token-balanced,
                                 the same count on every rank; micro-batch j -> rank j % R
    loss of rank r               sum_{m on r} loss_sum(m) / U,  U = global loss units
                                 (all-reduced), so the gradients SUM to the 1-process one
    rollouts                     all_gather_varlen: variable-length 1-D tensors of every
                                 rank, concatenated in rank order (global whitening)

Legend: R = world size (ranks), L_r = length of rank r's tensor, L = sum_r L_r.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` and its device.

    ``distributed`` is True when a process group exists (launched by torchrun, even with
    one process): that is what makes ``shard_model`` apply FSDP. ``mesh`` is the 1-D
    device mesh FSDP shards over (None when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes metrics and publishes checkpoints."""
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def launched_by_torchrun() -> bool:
    """torchrun (or a launcher like it) set this process's RANK and WORLD_SIZE."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE"))


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the torchrun process group (or return the single-process context).

    ``device``: "auto" (CUDA when available, else CPU), "cuda" or "cpu". Under torchrun
    with CUDA every process takes ``cuda:LOCAL_RANK``. Calling it again in a process
    whose group is already initialised returns a context for that group.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available on this machine")
    launched = launched_by_torchrun()
    if not launched and not dist.is_initialized():
        return DistContext(device=torch.device("cuda" if use_cuda else "cpu"))
    if launched:
        missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
        if missing and not dist.is_initialized():
            raise ValueError(
                f"RANK and WORLD_SIZE are set but {missing} are not: launch with torchrun "
                "(or set the whole rendezvous environment)"
            )
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices "
                "are visible: use --nproc_per_node <= the number of GPUs"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(seconds=timeout_s),
            # binding the device lets NCCL create its communicator eagerly and lets
            # barrier() know which GPU to use
            device_id=dev if use_cuda else None,
        )
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return DistContext(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=local_rank,
        device=dev,
        distributed=True,
        mesh=mesh,
    )


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def teardown(ctx: DistContext) -> None:
    """Barrier, then destroy the process group: exiting with a live group (or with one
    rank still inside a collective) makes NCCL/gloo abort noisily at interpreter exit."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def main_process_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the body first (e.g. materialising a model directory or a dataset
    cache), then the other ranks run it and find the work done."""
    if not ctx.is_main:
        barrier(ctx)
    try:
        yield
    finally:
        if ctx.is_main:
            barrier(ctx)


# ---------------------------------------------------------------------------------------
# collectives


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks (a new tensor; the input is left untouched)."""
    if not ctx.distributed:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def global_token_count(local_count: int | torch.Tensor, ctx: DistContext) -> int:
    """The sum over ranks of ``local_count`` (loss tokens, pairs, ...): the normaliser
    that makes R processes compute the same update as one. One host sync."""
    if not ctx.distributed:
        return int(local_count)
    t = torch.as_tensor(local_count, dtype=torch.int64).to(ctx.device).reshape(())
    return int(all_reduce_sum(t, ctx).item())


def all_gather_varlen(tensor: torch.Tensor, ctx: DistContext) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's ``tensor`` [L_r, ...] in rank order -> ([L, ...], [L_r]).

    Collectives need equal shapes, so each rank pads to max_r L_r; the lengths travel
    first (one small all_gather, one host sync). Trailing dims and dtype must agree."""
    if tensor.ndim < 1:
        raise ValueError(f"tensor must have at least 1 dim, got shape {tuple(tensor.shape)}")
    if not ctx.distributed:
        return tensor, [tensor.shape[0]]
    n = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.empty_like(n) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, n)
    lengths = [int(s.item()) for s in sizes]
    longest = max(lengths)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))  # [max L_r, ...]
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n_r] for p, n_r in zip(parts, lengths)]), lengths


def rank_slice(lengths: Sequence[int], ctx: DistContext) -> slice:
    """This rank's rows of a tensor gathered by ``all_gather_varlen``."""
    start = sum(lengths[: ctx.rank])
    return slice(start, start + lengths[ctx.rank])


def global_masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    ctx: DistContext,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``ops.masked_whiten`` with the mean and variance of the GLOBAL batch (all ranks'
    ``x`` [L_r] concatenated), returned for this rank's elements [L_r]: the same
    advantages R processes would get from one process holding every rollout."""
    from fastrlhf.ops.advantages import masked_whiten

    if x.ndim != 1 or (mask is not None and mask.shape != x.shape):
        raise ValueError(
            f"x must be 1-D [L] and mask None or of x's shape; got x {tuple(x.shape)}, "
            f"mask {None if mask is None else tuple(mask.shape)}"
        )
    if not ctx.distributed:
        return masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    xs, lengths = all_gather_varlen(x, ctx)  # [L]
    masks = None if mask is None else all_gather_varlen(mask, ctx)[0]  # [L]
    return masked_whiten(xs, masks, shift_mean=shift_mean, eps=eps)[rank_slice(lengths, ctx)]


# ---------------------------------------------------------------------------------------
# data


def shard_for_rank(micro_batches: Sequence[Any], ctx: DistContext) -> list[Any]:
    """This rank's micro-batches: j -> rank j % R (``pack_sequences(num_ranks=R)``'s
    convention). Every rank must get the same count, since each forward and backward
    under FSDP is a collective all ranks take part in."""
    if len(micro_batches) % ctx.world_size:
        raise ValueError(
            f"{len(micro_batches)} micro-batches cannot be split evenly over "
            f"{ctx.world_size} ranks: pack with pack_sequences(..., num_ranks={ctx.world_size})"
        )
    return list(micro_batches[ctx.rank :: ctx.world_size])


def rank_micro_batches(
    indices: Sequence[int], lengths: Sequence[int], max_tokens: int, ctx: DistContext
) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) of a step's examples.

    The examples are split into R Karmarkar-Karp groups of nearly equal token totals, one
    per rank; a group is packed under ``max_tokens`` by first-fit decreasing, and an
    example longer than ``max_tokens`` gets a micro-batch of its own (as with one
    process). Ranks may end up with different counts: FSDP needs every rank to run as
    many forwards, so the trainer pads to ``global_max`` of the counts with zero-weight
    repeats. With one process this is plain FFD packing of ``indices``."""
    import numpy as np

    from fastrlhf.data.packing import ffd_bins, kk_groups

    lens = np.asarray([lengths[i] for i in indices], dtype=np.int64)  # [n]
    if ctx.world_size > 1:
        group = sorted(kk_groups(lens, ctx.world_size)[ctx.rank])
    else:
        group = list(range(len(indices)))
    fits = [j for j in group if lens[j] <= max_tokens]
    too_long = [j for j in group if lens[j] > max_tokens]
    bins = ffd_bins(lens[fits], max_tokens) if fits else []
    out = [[indices[fits[b]] for b in bin_] for bin_ in bins]
    return out + [[indices[j]] for j in too_long]


def global_max(value: int, ctx: DistContext) -> int:
    """The largest ``value`` over the ranks (one small all-reduce, one host sync)."""
    if not ctx.distributed:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
