"""Directories published atomically: written under a temporary name, every file and the
directory fsynced, then one ``os.rename`` (the parent fsynced too). A kill at any moment
leaves the previous directory untouched or a ``.tmp-*`` one that the next write removes.
Checkpoints, exported models and the embedded model are written this way, by one
process (``atomic_write_dir``) or by every rank together (``atomic_write_dir_all_ranks``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from fastrlhf.distributed.context import DistContext, barrier
from fastrlhf.integrity import write_manifest


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
    final: str | Path,
    write: Callable[[Path], None],
    ctx: DistContext | None = None,
    *,
    manifest: bool = False,
) -> Path:
    """``atomic_write_dir`` for a write that every rank takes part in (its own shards, or
    a collective such as gathering a sharded model): rank 0 (re)creates ``tmp``, every
    rank runs ``write(tmp)``, rank 0 (with ``manifest``: writes MANIFEST.json over every
    rank's files, then) publishes ``tmp`` as ``final`` with one rename."""
    ctx = ctx or DistContext()
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
        if manifest:
            write_manifest(tmp)
        publish_dir(tmp, final)
    barrier(ctx)  # nobody reads the new directory before the rename
    return final
