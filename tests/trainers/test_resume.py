"""A run killed with SIGKILL after a checkpoint landed, then resumed with --resume, ends
with weights bit-identical to an uninterrupted run (CLI in a subprocess, tiny model)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastrlhf.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 12


def _cmd(run_dir: Path, model_dir: str, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "fastrlhf", "sft",
        f"run_dir={run_dir}", f"model.name_or_path={model_dir}",
        "data.max_length=40", "data.max_prompt_length=20", "data.num_train=32",
        "data.num_eval=8", "train.batch_size=8", "train.micro_batch_tokens=96",
        f"train.max_steps={MAX_STEPS}", "train.eval_every=6", "train.progress_bar=false",
        "train.cpu_threads=1", "optim.lr=3e-3", "optim.warmup_steps=3",
        "checkpoint.save_every=2", "checkpoint.keep_last=2", "logging.log_every=1",
        "logging.plots=false",
        *extra,
    ]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.setdefault("TRITON_INTERPRET", "1")
    return env


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted((run_dir / "final").glob("*.safetensors"))
    assert files, f"no safetensors in {run_dir / 'final'}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_model_dir, variant):
    # LoRA with dropout: the adapter weights live outside the HF export's names and the
    # dropout masks depend on the restored RNG state
    extra = ["model.lora_rank=4", "model.lora_dropout=0.1"] if variant == "lora" else []
    ref_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    # the uninterrupted run goes on beside the one that gets killed (2 cores)
    ref_proc = subprocess.Popen(
        _cmd(ref_dir, tiny_model_dir, extra),
        env=_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    proc = subprocess.Popen(
        _cmd(killed_dir, tiny_model_dir, extra),
        env=_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = killed_dir / "checkpoints" / "step_00000002"
    deadline = time.monotonic() + 240
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    steps = sorted(p.name for p in (killed_dir / "checkpoints").glob("step_*"))
    # killed partway: the run had not finished
    assert f"step_{MAX_STEPS:08d}" not in steps and not (killed_dir / "final").exists()

    _run(_cmd(killed_dir, tiny_model_dir, extra) + ["--resume"])
    _, err = ref_proc.communicate(timeout=300)
    assert ref_proc.returncode == 0, err.decode()[-3000:]
    ours, ref = _weights(killed_dir), _weights(ref_dir)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), f"{k} differs after resume"
    # the resumed run's curve is the uninterrupted one, each step logged once
    rows = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d / "metrics.jsonl")
                      if r["split"] == "train"]  # fmt: skip
    assert rows(killed_dir) == rows(ref_dir)
    assert [s for s, _ in rows(ref_dir)] == list(range(1, MAX_STEPS + 1))
