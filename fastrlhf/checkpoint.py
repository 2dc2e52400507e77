"""Atomic, resumable, safely loadable training checkpoints.

A checkpoint is a directory ``<run_dir>/checkpoints/step_XXXXXXXX/`` holding

    model/                  the stage's model in HF format (``save_pretrained``: safetensors
                            weights + config), loadable by transformers / the next stage
    extra_weights.safetensors  trainable tensors the HF export does not hold under a name we
                            can match exactly (LoRA adapters, reward heads); often absent
    weights_map.json        trainable parameter name -> (file, key) it is restored from
    trainer_state.pt        optimizer, scheduler, RNG states, step and data position:
                            tensors, numbers and strings only, read back with
                            ``torch.load(weights_only=True)`` (never arbitrary unpickling)

Atomicity: everything is written into ``.tmp-step_XXXXXXXX`` beside the final name, every
file and the directory are fsynced, then one ``os.rename`` publishes it and the parent is
fsynced. A kill at any moment leaves either the previous checkpoints untouched or a
``.tmp-*`` directory that is ignored (and removed by the next save). The latest
checkpoint is the highest ``step_*`` directory; older ones beyond ``keep_last`` go.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
# weights


def _safetensors_index(model_dir: Path) -> dict[str, str]:
    """tensor key -> file name (relative to model_dir) over every *.safetensors file there."""
    index: dict[str, str] = {}
    for path in sorted(model_dir.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                index.setdefault(key, str(path.relative_to(model_dir)))
    return index


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _write_weights(module: torch.nn.Module, ckpt: Path, save_model: Callable[[Path], None]):
    """HF export via ``save_model`` + whatever trainable tensors it does not hold exactly."""
    model_dir = ckpt / "model"
    save_model(model_dir)
    index = _safetensors_index(model_dir)
    mapping: dict[str, list[str]] = {}
    extra: dict[str, torch.Tensor] = {}
    handles: dict[str, Any] = {}
    try:
        for name, param in _trainable(module).items():
            parts = name.split(".")
            # the longest suffix of the parameter's name that the export holds, if the stored
            # tensor is bit-identical (so a wrong match can never be restored)
            found = None
            for i in range(len(parts)):
                key = ".".join(parts[i:])
                if key in index:
                    file = index[key]
                    if file not in handles:
                        handles[file] = safe_open(str(model_dir / file), framework="pt")
                    stored = handles[file].get_tensor(key)
                    if stored.dtype == param.dtype and torch.equal(stored, param.detach().cpu()):
                        found = [f"model/{file}", key]
                    break
            if found is None:
                extra[name] = param.detach().cpu().contiguous()
                found = ["extra_weights.safetensors", name]
            mapping[name] = found
    finally:
        handles.clear()
    if extra:
        save_file(extra, str(ckpt / "extra_weights.safetensors"))
    (ckpt / "weights_map.json").write_text(json.dumps(mapping, indent=0))


def load_weights(module: torch.nn.Module, ckpt: str | Path) -> None:
    """Copy a checkpoint's trainable tensors into ``module`` (bit-exact, safetensors only)."""
    ckpt = Path(ckpt)
    mapping = json.loads((ckpt / "weights_map.json").read_text())
    params = _trainable(module)
    missing = sorted(set(params) - set(mapping))
    if missing:
        raise ValueError(
            f"checkpoint {ckpt} has no weights for trainable parameters {missing[:5]} "
            f"({len(missing)} in all): was it written by a different model or LoRA setting?"
        )
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, (file, key) in mapping.items():
        by_file.setdefault(file, []).append((name, key))
    with torch.no_grad():
        for file, items in by_file.items():
            with safe_open(str(ckpt / file), framework="pt") as f:
                for name, key in items:
                    if name not in params:
                        raise ValueError(
                            f"checkpoint {ckpt}: {name!r} is not a trainable parameter"
                        )
                    t = f.get_tensor(key)
                    p = params[name]
                    if t.shape != p.shape or t.dtype != p.dtype:
                        raise ValueError(
                            f"checkpoint {ckpt}: {name!r} is {tuple(t.shape)} {t.dtype}, the "
                            f"model has {tuple(p.shape)} {p.dtype}"
                        )
                    p.copy_(t)


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


def save_checkpoint(
    root: str | Path,
    step: int,
    module: torch.nn.Module,
    save_model: Callable[[Path], None],
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and keep the last ``keep_last``."""
    root = Path(root)
    for stale in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)

    def write(tmp: Path) -> None:
        _write_weights(module, tmp, save_model)
        torch.save(trainer_state, tmp / "trainer_state.pt")

    path = atomic_write_dir(root / f"step_{step:08d}", write)
    for old in checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(old)
    return path


def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    """The optimizer / scheduler / RNG / position state of a checkpoint (weights_only)."""
    path = Path(ckpt) / "trainer_state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a fastrlhf checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)
