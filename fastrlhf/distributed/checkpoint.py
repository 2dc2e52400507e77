"""Sharded, atomic, reshardable checkpoints (torch.distributed.checkpoint) and the
consolidated HF export.

A sharded checkpoint is a directory

    <dir>/dcp/              DCP files: every rank writes its own shards of the model and
                            optimizer state plus global metadata (a shared filesystem is
                            assumed across nodes)
    <dir>/extra_state.json  rank 0's ``extra_state`` (step, scheduler, data position...):
                            tensors, numbers and strings as JSON (``fastrlhf.integrity``)
    <dir>/MANIFEST.json     every file's size and digest, verified before loading

State dicts go through ``torch.distributed.checkpoint.state_dict`` (get_state_dict /
set_state_dict): parameters and optimizer states are keyed by parameter NAME, not by
position or shard, so a checkpoint written by R processes loads into R' processes (DCP
reshards on load) or into an unsharded single-process model, and the other way round.

Atomicity as in ``fastrlhf.checkpoint``: all ranks write into ``.tmp-<name>`` beside the
final name; after a barrier rank 0 fsyncs the tree and publishes it with one rename.
A crash leaves the previous checkpoint and at worst a ``.tmp-*`` directory.

``export_hf`` gathers the full fp32 state dict on rank 0 (CPU) and writes the model with
transformers' ``save_pretrained(state_dict=...)``: a directory ``from_pretrained`` loads.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from fastrlhf.distributed.atomic import atomic_write_dir, atomic_write_dir_all_ranks
from fastrlhf.distributed.context import DistContext, barrier
from fastrlhf.distributed.safe_dcp import SafeFileSystemReader, SafeLoadPlanner, SafeSavePlanner
from fastrlhf.errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from fastrlhf.integrity import has_manifest, load_state_json, save_state_json, verify_manifest

DCP_DIR = "dcp"
EXTRA_FILE = "extra_state.json"


@contextlib.contextmanager
def _single_process_dcp(ctx: DistContext) -> Iterator[None]:
    """Without a process group DCP warns on every call that it assumes one process;
    here that is the intent (the single-process context), so the warning is noise."""
    with warnings.catch_warnings():
        if not ctx.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _as_list(optimizers) -> list[torch.optim.Optimizer]:
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    return list(optimizers)


def _dcp_state(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict:
    """The state DCP saves from and loads into: model (+ optimizers), keyed by name.
    Several optimizers of one model (policy and critic under one wrapper) merge into one
    optimizer state keyed by parameter name."""
    if not optimizers:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizers)
    return {"model": model_sd, "optim": optim_sd}


def write_sharded(
    directory: str | Path,
    model: torch.nn.Module,
    optimizers: torch.optim.Optimizer | list[torch.optim.Optimizer] | None,
    ctx: DistContext,
) -> None:
    """DCP-save model (+ optimizers) into ``directory`` (created by DCP); not atomic on its
    own: callers write into a temporary directory and publish it. Every rank calls it."""
    state = _dcp_state(model, _as_list(optimizers))
    with _single_process_dcp(ctx):
        dcp.save(
            state,
            checkpoint_id=str(directory),
            planner=SafeSavePlanner(),
            no_dist=not ctx.distributed,
        )


def read_sharded(
    directory: str | Path,
    model: torch.nn.Module,
    optimizers: torch.optim.Optimizer | list[torch.optim.Optimizer] | None,
    ctx: DistContext,
) -> None:
    """Load ``write_sharded``'s ``directory`` into model (+ optimizers), resharding to this
    world size. Every rank calls it."""
    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise CheckpointNotFoundError(f"{directory} is not a DCP checkpoint (no .metadata file)")
    optimizers = _as_list(optimizers)
    state = _dcp_state(model, optimizers)
    reader = SafeFileSystemReader(directory)
    try:
        with _single_process_dcp(ctx):
            dcp.load(
                state,
                storage_reader=reader,
                planner=SafeLoadPlanner(),
                no_dist=not ctx.distributed,
            )
    except CheckpointException as e:
        # a BaseException subclass in torch, whose message is every rank's traceback: a
        # bad file is reported as such (naming it), a mismatch as what did not match
        failures = [exc for _, (exc, _) in sorted(e.failures.items())]
        for exc in failures:
            if isinstance(exc, CheckpointError):
                raise CheckpointError(str(exc)) from None
        causes = "; ".join(f"rank {r}: {exc}" for r, (exc, _) in sorted(e.failures.items()))
        raise CheckpointMismatchError(
            f"cannot load {directory} into this model (was it saved with another model "
            f"config?): {causes}"
        ) from None
    if not optimizers:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(
            model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )


def save_sharded(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra_state: dict[str, Any] | None,
    ctx: DistContext,
) -> Path:
    """Write model (+ optimizer) shards and ``extra_state`` atomically to ``path``, with a
    MANIFEST.json that ``load_sharded`` verifies before reading anything.

    Every rank must call it (DCP save is a collective). Returns ``path``."""

    def write(tmp: Path) -> None:
        write_sharded(tmp / DCP_DIR, model, optimizer, ctx)
        if ctx.is_main and extra_state is not None:
            save_state_json(extra_state, tmp / EXTRA_FILE)

    return atomic_write_dir_all_ranks(path, write, ctx, manifest=True)


def load_sharded(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    ctx: DistContext,
) -> dict[str, Any]:
    """Restore model (+ optimizer) from ``save_sharded``'s directory, whatever the world
    size that wrote it; returns the extra state (empty when none was saved).

    Every rank must call it. Build (and shard) the model and the optimizer first: an
    optimizer that has not stepped gets its state initialised by a zero-lr step so
    there are tensors to load into."""
    path = Path(path)
    if not (path / DCP_DIR / ".metadata").is_file():
        raise CheckpointNotFoundError(
            f"{path} is not a sharded checkpoint (no {DCP_DIR}/.metadata)"
        )
    if has_manifest(path):  # written by save_sharded since manifests exist
        verify_manifest(path)
    read_sharded(path / DCP_DIR, model, optimizer, ctx)
    extra = path / EXTRA_FILE
    return load_state_json(extra) if extra.is_file() else {}


# ---------------------------------------------------------------------------------------
# consolidated export


def full_state_dict(model: torch.nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The unsharded fp32 state dict on CPU, on rank 0 ({} on the others); a collective.

    Tied parameters (embedding = lm_head) come back as ONE tensor under all their names,
    as in the live model, so savers that drop aliases (safetensors) see the tie."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=options)
    if not sd:
        return sd
    first_name: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        alias = first_name.setdefault(id(p), name)
        if alias != name and alias in sd and name in sd:
            sd[name] = sd[alias]
    return sd


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _write_hf(model: torch.nn.Module, sd: dict[str, torch.Tensor], out: Path) -> None:
    """Write ``model`` in the format its own ``save_pretrained`` writes, from ``sd``."""
    from fastrlhf.models import PolicyModel, ValueModel

    if isinstance(model, PolicyModel):
        # the HF CausalLM (or the peft model: adapter only, as PolicyModel.save_pretrained)
        model.model.save_pretrained(str(out), state_dict=_strip(sd, "model."))
    elif isinstance(model, ValueModel):
        from safetensors.torch import save_file

        from fastrlhf.models.value import HEAD_FILE, STATS_FILE

        model.backbone.save_pretrained(str(out), state_dict=_strip(sd, "backbone."))
        head = {k: v.contiguous() for k, v in _strip(sd, "score.").items()}
        save_file(head, str(out / HEAD_FILE))
        stats = {
            "format": "fastrlhf.ValueModel",
            "hidden_size": int(model.score.in_features),
            "reward_mean": model.reward_mean,
            "reward_std": model.reward_std,
        }
        (out / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(str(out), state_dict=sd)
    else:
        raise TypeError(f"export_hf: {type(model).__name__} has no HF save_pretrained")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def write_hf(out: str | Path, models: dict[str, torch.nn.Module], ctx: DistContext) -> None:
    """Consolidated HF-format models written by rank 0 into ``out/<subdir>`` for each
    ``{subdir: model}`` ("" = ``out`` itself), e.g. {"": policy, "critic": critic}. Not
    atomic on its own. Every rank calls it (the gathers are collectives)."""
    out = Path(out)
    gathered = {sub: full_state_dict(model, ctx) for sub, model in models.items()}
    if ctx.is_main:
        for sub, model in models.items():
            target = out / sub if sub else out
            target.mkdir(parents=True, exist_ok=True)
            _write_hf(model, gathered[sub], target)
    barrier(ctx)


def export_hf(path: str | Path, model: torch.nn.Module, ctx: DistContext) -> Path:
    """Consolidated HF-format model (config + safetensors + tokenizer) at ``path``,
    written atomically by rank 0. Every rank must call it (the gather is a collective)."""

    final = Path(path)
    sd = full_state_dict(model, ctx)
    if ctx.is_main:
        atomic_write_dir(final, lambda tmp: _write_hf(model, sd, tmp))
    barrier(ctx)
    return final
