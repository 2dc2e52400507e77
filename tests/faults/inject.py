"""``python -m tests.faults.inject POINT STEP -- <fastrlhf CLI args>``: run the CLI with
one fault injected into the save of checkpoint ``STEP``.

POINT is where in that save the process dies (SIGKILL: no cleanup, no atexit):

    dcp        right after every DCP shard of the checkpoint is written
    state      at the first state file (RNG), after dcp/ and model/ are written
    manifest   after MANIFEST.json is written, before the directory is renamed
    prune      after the rename, when pruning starts removing an older checkpoint

or ``enospc``: the trainer-state write fails with "No space left on device" (the run
then exits with a one-line error and status 2).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
from pathlib import Path


def _step_of(path) -> int | None:
    m = re.search(r"step_(\d{8})", str(path))
    return int(m.group(1)) if m else None


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, step: int) -> None:
    import fastrlhf.checkpoint as ck
    import fastrlhf.distributed.checkpoint as dck

    if point == "dcp":
        real_sharded = dck.write_sharded

        def write_sharded(directory, *a, **k):
            real_sharded(directory, *a, **k)
            if _step_of(directory) == step:
                _die()

        dck.write_sharded = write_sharded
    elif point in ("state", "enospc"):
        real_state = ck.save_state_json

        def save_state_json(state, path):
            if _step_of(path) == step:
                if point == "state":
                    _die()
                if Path(path).name == "trainer_state.json":
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
            real_state(state, path)

        ck.save_state_json = save_state_json
    elif point == "manifest":
        import fastrlhf.distributed.atomic as atomic  # where a save writes its manifest

        real_manifest = atomic.write_manifest

        def write_manifest(root):
            out = real_manifest(root)
            if _step_of(root) == step:
                _die()
            return out

        atomic.write_manifest = write_manifest
    elif point == "prune":
        real_rmtree = ck.shutil.rmtree

        class _Shutil:  # only fastrlhf.checkpoint's own view of shutil changes
            def __getattr__(self, name):
                return getattr(sys.modules["shutil"], name)

            @staticmethod
            def rmtree(path, *a, **k):
                if (
                    Path(path).name.startswith("step_")
                    and (Path(path).parent / f"step_{step:08d}").exists()
                ):
                    _die()
                return real_rmtree(path, *a, **k)

        ck.shutil = _Shutil()
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    point, step, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: inject POINT STEP -- ARGS"
    install(point, int(step))
    from fastrlhf.cli import main

    sys.exit(main(args))
