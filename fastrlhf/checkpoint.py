"""Atomic, resumable, reshardable, safely loadable training checkpoints.

A checkpoint is a directory ``<run_dir>/checkpoints/step_XXXXXXXX/`` holding

    dcp/                    model and optimizer state through torch.distributed.checkpoint,
                            keyed by parameter NAME: every rank writes its own shards, and
                            any world size (1 included) loads them, resharded
    model/                  the stage's model in HF format (``save_pretrained``: safetensors
                            weights + config), loadable by transformers / the next stage
    trainer_state.pt        step, schedulers, data position, world size (rank 0's):
                            tensors, numbers and strings only, read back with
                            ``torch.load(weights_only=True)`` (never arbitrary unpickling)
    rng/rank_RRRRR.pt       each rank's torch / Python / numpy (/ CUDA) RNG state

The same format serves one process and many, so a run resumes with another world size
(``load_checkpoint``: RNG states then restart from the seed, everything else is exact).

Atomicity: everything is written into ``.tmp-step_XXXXXXXX`` beside the final name, every
file and the directory are fsynced, then one ``os.rename`` publishes it and the parent is
fsynced. A kill at any moment leaves either the previous checkpoints untouched or a
``.tmp-*`` directory that is ignored (and removed by the next save). The latest
checkpoint is the highest ``step_*`` directory; older ones beyond ``keep_last`` go.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from fastrlhf.distributed import DistContext

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (directories after their entries)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def atomic_write_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` then publish ``tmp_dir`` as ``final`` with one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    return publish_dir(tmp, final)


def publish_dir(tmp: Path, final: Path) -> Path:
    """fsync the finished ``tmp`` tree, then make it ``final`` with one rename."""
    fsync_tree(tmp)
    if final.exists():
        # rename(2) cannot replace a non-empty directory: move the old one aside first.
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_path(final.parent)
    return final


def atomic_write_dir_all_ranks(
    final: str | Path, write: Callable[[Path], None], ctx: DistContext | None = None
) -> Path:
    """``atomic_write_dir`` for a write that every rank takes part in (its own shards, or
    a collective such as gathering a sharded model): rank 0 (re)creates ``tmp``, every
    rank runs ``write(tmp)``, rank 0 publishes ``tmp`` as ``final`` with one rename."""
    from fastrlhf.distributed import barrier

    ctx = ctx or _single()
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}"
    if ctx.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(ctx)  # the others write into tmp only once rank 0 has (re)created it
    write(tmp)
    barrier(ctx)  # every rank's files are written before rank 0 publishes
    if ctx.is_main:
        publish_dir(tmp, final)
    barrier(ctx)  # nobody reads the new directory before the rename
    return final


# ---------------------------------------------------------------------------------------
# RNG state as tensors and numbers only (loadable with weights_only=True)


def rng_state() -> dict[str, Any]:
    # numpy's legacy global generator: libraries (and user code) may still draw from it
    np_state = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(  # noqa: NPY002
        ("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------
# whole checkpoints


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Published checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def _rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / "rng" / f"rank_{rank:05d}.pt"


def save_checkpoint(
    root: str | Path,
    step: int,
    module: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    trainer_state: dict[str, Any],
    *,
    export: Callable[[Path], None],
    keep_last: int,
    ctx: DistContext | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root``; keep the last ``keep_last``.

    Every rank calls it. ``export(dir)`` writes the model in HF format into ``dir`` (a
    collective too when the model is sharded); ``trainer_state`` (rank 0's: step,
    schedulers, data position...) must hold only tensors, numbers and strings."""
    from fastrlhf.distributed.checkpoint import write_sharded

    ctx = ctx or _single()
    root = Path(root)
    if ctx.is_main:
        # a crash may have left a half-written .tmp-* or, mid-publish, an .old-* directory
        for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")] if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)

    def write(tmp: Path) -> None:
        write_sharded(tmp / "dcp", module, optimizers, ctx)
        export(tmp / "model")
        _rng_file(tmp, ctx.rank).parent.mkdir(exist_ok=True)  # every rank, race-free
        torch.save(rng_state(), _rng_file(tmp, ctx.rank))
        if ctx.is_main:
            torch.save({**trainer_state, "world_size": ctx.world_size}, tmp / "trainer_state.pt")

    final = atomic_write_dir_all_ranks(root / f"step_{step:08d}", write, ctx)
    if ctx.is_main:  # after the publish: the other ranks never read old checkpoints
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old)
    return final


def load_checkpoint(
    ckpt: str | Path,
    module: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    *,
    seed: int,
    ctx: DistContext | None = None,
) -> dict[str, Any]:
    """Restore ``save_checkpoint``'s weights and optimizer states into ``module`` and
    ``optimizers`` (built, and sharded, first), whatever the world size that wrote them;
    set this rank's RNG; return the trainer state. Every rank calls it.

    RNG: with the world size that wrote the checkpoint each rank gets its own state back
    (a bit-identical continuation); with another one there is no such state to restore,
    so rank r is seeded from (seed, step, r) instead."""
    from fastrlhf.distributed.checkpoint import read_sharded

    ctx = ctx or _single()
    ckpt = Path(ckpt)
    state = load_trainer_state(ckpt)
    read_sharded(ckpt / "dcp", module, optimizers, ctx)
    rng = _rng_file(ckpt, ctx.rank)
    if state.get("world_size") == ctx.world_size and rng.is_file():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    else:
        seed_rank(seed * 1_000_003 + int(state["step"]), ctx.rank)
    return state


def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    """The scheduler / position / step state of a checkpoint (weights_only)."""
    path = Path(ckpt) / "trainer_state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a fastrlhf checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch, Python and numpy's global generators for ``rank`` (distinct streams)."""
    value = (seed + 7919 * rank) % 2**32
    random.seed(value)
    np.random.seed(value)  # noqa: NPY002 - the legacy global generator others may use
    torch.manual_seed(value)


def _single() -> DistContext:
    from fastrlhf.distributed import DistContext

    return DistContext()
