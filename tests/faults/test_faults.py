"""Fault injection around checkpoints (CLI in subprocesses, tiny model, 4 steps).

Each fault is followed by ``--resume``. The resumed run must end bit-identical to an
uninterrupted one (final weights and the logged curve), falling back to an earlier
checkpoint with a one-line warning where the latest is damaged; no checkpoint that was
published before the fault is ever changed (its manifest still verifies, its bytes are
the same after the resume), and a damaged one is kept aside, never deleted.

Faults: SIGKILL at four points of a save (``tests/faults/inject.py``), a flipped byte, a
truncated file, a deleted file, and a full disk (a patched write failing with ENOSPC).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastrlhf.checkpoint import checkpoint_dirs, verify_checkpoint
from fastrlhf.metrics import read_metrics

pytestmark = pytest.mark.slow  # 14 CLI runs of a few seconds of CPU each

REPO = Path(__file__).resolve().parents[2]
ARGS = [
    "data.max_length=40",
    "data.max_prompt_length=20",
    "data.num_train=16",
    "data.num_eval=4",
    "train.batch_size=4",
    "train.micro_batch_tokens=96",
    "train.max_steps=4",
    "train.eval_every=0",
    "train.progress_bar=false",
    "train.cpu_threads=1",
    "optim.lr=3e-3",
    "optim.warmup_steps=1",
    "checkpoint.save_every=1",
    "checkpoint.keep_last=2",
    "checkpoint.save_final=true",
    "logging.plots=false",
    "logging.log_every=1",
]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.setdefault("TRITON_INTERPRET", "1")
    return env


def _cli(run: Path, model: str, *flags: str, fault: tuple[str, int] | None = None):
    prefix = [sys.executable, "-m"]
    if fault is None:
        prefix += ["fastrlhf", "sft"]
    else:
        prefix += ["tests.faults.inject", fault[0], str(fault[1]), "--", "sft"]
    cmd = [*prefix, *flags, f"run_dir={run}", f"model.name_or_path={model}", *ARGS]
    return subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)


def _ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / "final").glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no final weights in {run}"
    return out


def _curve(run: Path) -> list[tuple[int, float]]:
    rows = read_metrics(run / "metrics.jsonl")
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def _digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _published(run: Path) -> dict[str, dict[str, str]]:
    return {p.name: _digest(p) for p in checkpoint_dirs(run / "checkpoints")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from fastrlhf.data.embedded import embedded_model

    return embedded_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    _ok(_cli(run, model_dir))
    assert [s for s, _ in _curve(run)] == [1, 2, 3, 4]
    return run


def _assert_same_as_reference(run: Path, reference: Path) -> None:
    ours, ref = _weights(run), _weights(reference)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), f"{k} differs from the uninterrupted run"
    assert _curve(run) == _curve(reference)


def _assert_unchanged(before: dict[str, dict[str, str]], run: Path) -> None:
    """Every checkpoint published before the fault is byte-identical now, or was pruned
    by a later save (keep_last) - never modified in place."""
    after = _published(run)
    for name, files in before.items():
        if name in after:
            assert after[name] == files, f"{name} changed"


@pytest.mark.parametrize("point,step", [("dcp", 2), ("state", 2), ("manifest", 2), ("prune", 3)])
def test_sigkill_during_save_then_resume(tmp_path, model_dir, reference, point, step):
    run = tmp_path / "run"
    out = _cli(run, model_dir, fault=(point, step))
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    published = _published(run)
    assert published, "no checkpoint was published before the kill"
    for name in published:  # what was published before the kill still verifies
        assert verify_checkpoint(run / "checkpoints" / name)
    # the kill left at most an unpublished .tmp-* beside them
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert names - set(published) <= {f".tmp-step_{step:08d}"}, names

    _ok(_cli(run, model_dir, "--resume"))
    _assert_same_as_reference(run, reference)
    _assert_unchanged(published, run)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


@pytest.mark.parametrize(
    "fault,rel",
    [
        (_flip, "dcp/__0_0.distcp"),
        (_truncate, "model/model.safetensors"),
        (Path.unlink, "rng/rank_00000.json"),
    ],
    ids=["flipped-byte", "truncated", "deleted"],
)
def test_damaged_latest_falls_back_with_a_warning(tmp_path, model_dir, reference, fault, rel):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "final")
    (run / "metrics.jsonl").write_text(  # as if the run had died right after step 4's save
        (reference / "metrics.jsonl").read_text()
    )
    latest = run / "checkpoints" / "step_00000004"
    fault(latest / rel)
    damaged = _digest(latest)
    before = _published(run)

    out = _ok(_cli(run, model_dir, "--resume"))
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, out.stderr
    assert "step_00000004" in warnings[0] and rel in warnings[0], warnings[0]
    assert "resumed from" in out.stdout and "step_00000003" in out.stdout
    _assert_same_as_reference(run, reference)
    # the damaged checkpoint is kept as it was; the one resumed from is unchanged
    assert _digest(run / "checkpoints" / "rejected-step_00000004") == damaged
    assert _published(run)["step_00000003"] == before["step_00000003"]


def test_full_disk_during_save_then_resume(tmp_path, model_dir, reference):
    run = tmp_path / "run"
    out = _cli(run, model_dir, fault=("enospc", 2))
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("fastrlhf: error:") and "no space left on device" in lines[-1]
    assert "trainer_state.json" in lines[-1] and "Traceback" not in out.stderr
    published = _published(run)
    assert list(published) == ["step_00000001"]
    assert verify_checkpoint(run / "checkpoints" / "step_00000001")

    _ok(_cli(run, model_dir, "--resume"))
    _assert_same_as_reference(run, reference)
    _assert_unchanged(published, run)
