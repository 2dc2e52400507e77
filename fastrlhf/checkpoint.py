"""Atomic, verified, resumable, reshardable training checkpoints that never run code.

A checkpoint is a directory ``<run_dir>/checkpoints/step_XXXXXXXX/`` holding

    dcp/                    model and optimizer state through torch.distributed.checkpoint,
                            keyed by parameter NAME: every rank writes its own shards, and
                            any world size (1 included) loads them, resharded
                            (``fastrlhf.distributed.safe_dcp``: allow-listed metadata,
                            non-tensor entries as JSON)
    model/                  the stage's model in HF format (``save_pretrained``: safetensors
                            weights + config), loadable by transformers / the next stage
    trainer_state.json      step, schedulers, data position, world size (rank 0's) as JSON
    rng/rank_RRRRR.json     each rank's torch / Python / numpy (/ CUDA) RNG state as JSON
    MANIFEST.json           size + xxh3-128 digest of every other file, written last

Loading never unpickles anything: state files are JSON (``fastrlhf.integrity``), DCP's
metadata goes through an allow-list of its own classes, and tensors are decoded from
``torch.save``'s archive without running its pickle (``fastrlhf.distributed.safe_dcp``).
``load_checkpoint`` checks the manifest before it deserializes anything;
``resume_checkpoint`` picks the newest checkpoint that verifies, warns about each newer
one it skips and moves that one aside as ``rejected-step_XXXXXXXX`` (never deleted).
Checkpoints written before manifests (``trainer_state.pt``, ``rng/*.pt``: decoded the
same pickle-free way) load with a one-line note.

The same format serves one process and many, so a run resumes with another world size
(``load_checkpoint``: RNG states then restart from the seed, everything else is exact).

Atomicity: everything is written into ``.tmp-step_XXXXXXXX`` beside the final name, the
manifest last, every file and the directory are fsynced, then one ``os.rename`` publishes
it and the parent is fsynced. A kill at any moment leaves either the previous checkpoints
untouched or a ``.tmp-*`` directory that is ignored (and removed by the next save). The
latest checkpoint is the highest ``step_*`` directory; older ones beyond ``keep_last`` go.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fastrlhf.distributed.atomic import (  # noqa: F401 - part of this module's API
    atomic_write_dir,
    atomic_write_dir_all_ranks,
    fsync_tree,
    publish_dir,
)
from fastrlhf.errors import CheckpointError, RunDirError, UserError, user_error_from_os
from fastrlhf.integrity import (
    has_manifest,
    load_state_json,
    save_state_json,
    verify_manifest,
)

if TYPE_CHECKING:  # pragma: no cover
    from fastrlhf.distributed import DistContext

_STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"
_LEGACY_TRAINER_STATE = "trainer_state.pt"
REJECTED_PREFIX = "rejected-"
# what a training run writes into its run dir (glob patterns; --overwrite removes these)
RUN_OUTPUTS = (
    "checkpoints",
    "final",
    "metrics.jsonl",
    "malformed.jsonl",
    "plots",
    "tensorboard",
    "config.yaml",
    "embedded_model",
    "reference_logps_*.safetensors",
)


# ---------------------------------------------------------------------------------------
# RNG state as tensors and numbers only (stored as JSON)


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


def _rng_file(ckpt: Path, rank: int, suffix: str = ".json") -> Path:
    return ckpt / "rng" / f"rank_{rank:05d}{suffix}"


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
    schedulers, data position...) must hold only tensors, numbers, strings, lists,
    tuples and dicts. A full disk or a permission problem is a ``UserError`` naming the
    file; the previous checkpoints are untouched either way."""
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
        save_state_json(rng_state(), _rng_file(tmp, ctx.rank))
        if ctx.is_main:
            save_state_json({**trainer_state, "world_size": ctx.world_size}, tmp / TRAINER_STATE)

    final = root / f"step_{step:08d}"
    try:
        atomic_write_dir_all_ranks(final, write, ctx, manifest=True)
    except OSError as e:
        converted = user_error_from_os(e, f"saving checkpoint {final}")
        if converted is None:
            raise
        raise converted from e
    if ctx.is_main:  # after the publish: the other ranks never read old checkpoints
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old)
    return final


def verify_checkpoint(ckpt: str | Path) -> bool:
    """Check ``ckpt`` against its manifest before anything in it is deserialized: True
    when verified, False for a checkpoint from before manifests (nothing to verify);
    ``CheckpointError`` naming the file that differs."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    if has_manifest(ckpt):
        verify_manifest(ckpt)
        return True
    if (ckpt / _LEGACY_TRAINER_STATE).is_file():
        return False
    if (ckpt / TRAINER_STATE).is_file():  # a current-format checkpoint always has one
        raise CheckpointError(f"{ckpt / 'MANIFEST.json'}: missing")
    raise CheckpointError(f"{ckpt / TRAINER_STATE}: missing: not a fastrlhf checkpoint")


def load_checkpoint(
    ckpt: str | Path,
    module: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    *,
    seed: int,
    ctx: DistContext | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Restore ``save_checkpoint``'s weights and optimizer states into ``module`` and
    ``optimizers`` (built, and sharded, first), whatever the world size that wrote them;
    set this rank's RNG; return the trainer state. Every rank calls it.

    ``verify``: check the manifest first (``verify_checkpoint``; ``resume_checkpoint``
    has done so already). RNG: with the world size that wrote the checkpoint each rank
    gets its own state back (a bit-identical continuation); with another one there is no
    such state to restore, so rank r is seeded from (seed, step, r) instead."""
    from fastrlhf.distributed.checkpoint import read_sharded

    ctx = ctx or _single()
    ckpt = Path(ckpt)
    if verify and not verify_checkpoint(ckpt) and ctx.is_main:
        print(_legacy_note(ckpt))
    state = load_trainer_state(ckpt)
    read_sharded(ckpt / "dcp", module, optimizers, ctx)
    rng, legacy_rng = _rng_file(ckpt, ctx.rank), _rng_file(ckpt, ctx.rank, ".pt")
    if state.get("world_size") == ctx.world_size and rng.is_file():
        _restore_rng(load_state_json(rng), rng)
    elif state.get("world_size") == ctx.world_size and legacy_rng.is_file():
        _restore_rng(_legacy_load(legacy_rng), legacy_rng)
    else:
        seed_rank(seed * 1_000_003 + int(state["step"]), ctx.rank)
    return state


def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    """The scheduler / position / step state of a checkpoint (JSON; or, in checkpoints
    from before manifests, a ``trainer_state.pt`` decoded without unpickling)."""
    ckpt = Path(ckpt)
    path = ckpt / TRAINER_STATE
    if path.is_file():
        state = load_state_json(path)
    elif (ckpt / _LEGACY_TRAINER_STATE).is_file():
        path = ckpt / _LEGACY_TRAINER_STATE
        state = _legacy_load(path)
    else:
        raise CheckpointError(f"{path}: missing: not a fastrlhf checkpoint")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}: not a trainer state (no integer 'step')")
    return state


def _legacy_load(path: Path) -> Any:
    """A pre-manifest ``.pt`` file (``torch.save`` of tensors and plain data), decoded
    without unpickling (``fastrlhf.distributed.tensor_file.read_saved``)."""
    from fastrlhf.distributed.tensor_file import read_saved

    try:
        return read_saved(path.read_bytes())
    except (ValueError, RecursionError, OSError) as e:  # truncated, refused, I/O error
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {first})") from None


def _restore_rng(state: Any, path: Path) -> None:
    """``set_rng_state`` from a file's contents; anything unusable names the file."""
    ok = (
        isinstance(state, dict)
        and isinstance(state.get("torch"), torch.Tensor)
        and state["torch"].dtype == torch.uint8
        and isinstance(state.get("python"), (list, tuple))
        and len(state["python"]) == 3
        and isinstance(state.get("numpy"), dict)
    )
    if not ok:
        raise CheckpointError(f"{path}: not an RNG state")
    try:
        set_rng_state(state)
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a usable RNG state ({type(e).__name__}: {e})") from None


def _legacy_note(ckpt: Path) -> str:
    return f"note: {ckpt} has no MANIFEST.json (saved before integrity checks): loaded unverified"


def resume_checkpoint(root: str | Path, ctx: DistContext | None = None) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (None when there is none at
    all); every rank gets the same answer.

    Rank 0 verifies, newest first. When an older one verifies, each newer one that failed
    gets one warning line naming it and the file, and is moved aside to
    ``rejected-step_XXXXXXXX`` (so no later save or pruning ever deletes it). When none
    verifies nothing is moved and ``CheckpointError`` names the newest failure."""
    from fastrlhf.distributed.context import global_max

    ctx = ctx or _single()
    root = Path(root)
    chosen, failures = -1, []
    if ctx.is_main:
        dirs = checkpoint_dirs(root)
        for ckpt in reversed(dirs):
            try:
                legacy = not verify_checkpoint(ckpt)
            except CheckpointError as e:
                failures.append((ckpt, e))
                continue
            for bad, e in failures:
                aside = _set_aside(bad)
                print(
                    f"warning: skipping checkpoint {bad.name}: {e}; kept as {aside.name}",
                    file=sys.stderr,
                )
            if legacy:
                print(_legacy_note(ckpt))
            chosen = int(ckpt.name.removeprefix("step_"))
            break
        if dirs and chosen < 0:
            chosen = -2
    chosen = global_max(chosen, ctx)  # rank 0's answer (the others offer -1 < it)
    if chosen == -2:
        newest = f"{failures[0][1]}" if failures else "see rank 0"
        raise CheckpointError(
            f"--resume: none of the checkpoints in {root} verifies; newest failure: {newest}"
        )
    return root / f"step_{chosen:08d}" if chosen >= 0 else None


def _set_aside(ckpt: Path) -> Path:
    aside = ckpt.with_name(REJECTED_PREFIX + ckpt.name)
    n = 1
    while aside.exists():
        aside = ckpt.with_name(f"{REJECTED_PREFIX}{ckpt.name}.{n}")
        n += 1
    os.rename(ckpt, aside)
    return aside


def refuse_stale_checkpoints(root: str | Path) -> None:
    """A fresh run must not mix with (or prune away) an earlier run's checkpoints."""
    old = checkpoint_dirs(root)
    if old:
        raise RunDirError(
            f"{root} holds {len(old)} checkpoint(s) of an earlier run (newest "
            f"{old[-1].name}): pass --resume to continue it or --overwrite to start over"
        )


def claim_run_dir(
    run_dir: str | Path,
    *,
    resume: bool,
    overwrite: bool,
    ignore: tuple[str | Path, ...] = (),
    main: bool = True,
) -> None:
    """Check the run dir before a run starts: a fresh run (no ``resume``) refuses a
    non-empty ``run_dir`` unless ``overwrite``, which removes what an earlier run wrote
    there (``RUN_OUTPUTS``; other files are left alone). ``ignore``: paths that do not
    make the dir "non-empty" (the config file the user passed). ``main``: this process
    removes (rank 0); the others only check."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pass one")
    run_dir = Path(run_dir)
    if resume or not run_dir.is_dir():
        return
    skip = {Path(p).resolve() for p in ignore}
    entries = sorted(p.name for p in run_dir.iterdir() if p.resolve() not in skip)
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise RunDirError(
            f"run_dir {run_dir} is not empty ({shown}): pass --resume to continue that run "
            "or --overwrite to start over"
        )
    if not main:
        return
    removed = sorted({p.name for pattern in RUN_OUTPUTS for p in run_dir.glob(pattern)})
    for name in removed:
        path = run_dir / name
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError as e:
            converted = user_error_from_os(e, f"--overwrite: removing {path}")
            raise (converted or e) from e
    if removed:
        print(f"--overwrite: removed {', '.join(removed)} from {run_dir}", file=sys.stderr)


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch, Python and numpy's global generators for ``rank`` (distinct streams)."""
    value = (seed + 7919 * rank) % 2**32
    random.seed(value)
    np.random.seed(value)  # noqa: NPY002 - the legacy global generator others may use
    torch.manual_seed(value)


def _single() -> DistContext:
    from fastrlhf.distributed import DistContext

    return DistContext()
