"""Every stage's trainer under ``torchrun -m fastrlhf``: 2 processes (FSDP2, gloo on CPU)
against 1 on the same global batch, through the real command line.

- SFT: the loss curve of 4 optimizer steps agrees within 1e-5 and so do the final weights
  (up to float32 summation order); the 2-process run resumes from its step-2 checkpoint
  bit-identically with 2 processes, and within 1e-5 with 1 process (a different world
  size: DCP reshards on load).
- PPO (critic, GAE, KL to a frozen reference, reward function): one iteration of two
  mini-batches gives the same losses, rollout statistics and final weights. Rollouts are
  sampled with per-sequence keys, so each rank draws exactly the tokens one process draws.
- DPO and GRPO run one step with 2 processes and write loadable HF exports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastrlhf.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300

COMMON = [
    "model.name_or_path=embedded", "data.source=embedded", "data.num_eval=8",
    "data.max_length=40", "data.max_prompt_length=20", "data.embedded_max_operand=19",
    "train.progress_bar=false", "train.cpu_threads=1", "logging.log_every=1",
    "logging.plots=false", "optim.warmup_steps=0", "optim.schedule=constant",
]  # fmt: skip

SFT = [
    *COMMON, "data.num_train=48", "train.batch_size=12", "train.micro_batch_tokens=64",
    "train.max_steps=4", "train.eval_every=0", "optim.lr=3e-3",
    "checkpoint.save_every=2", "checkpoint.keep_last=2",
]  # fmt: skip

PPO = [
    *COMMON, "data.num_train=32", "train.max_steps=1", "train.eval_every=0",
    "train.micro_batch_tokens=48", "optim.lr=1e-3", "checkpoint.save_every=0",
    "ppo.kind=ppo", "ppo.reward_fn=fastrlhf.trainers.rewards:arithmetic_reward",
    "ppo.rollout_batch_size=8", "ppo.n_samples=1", "ppo.max_new_tokens=4",
    "ppo.ppo_epochs=1", "ppo.num_mini_batches=2", "ppo.kl_coef=0.1", "ppo.critic_lr=1e-3",
]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("TRITON_INTERPRET", "1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def fastrlhf(nproc: int, stage: str, run_dir: Path, args: list[str], *extra: str) -> None:
    """``python -m fastrlhf`` (1) or ``torchrun --nproc_per_node=N -m fastrlhf`` (N > 1)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "fastrlhf", stage]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={nproc}", "-m", "fastrlhf", stage]
    cmd += [*extra, f"run_dir={run_dir}", *args]
    out = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    log = out.stdout + out.stderr
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{stage}_{nproc}proc.log").write_text(log)
    if out.returncode != 0:
        lines = [ln for ln in log.splitlines() if "Loading weights" not in ln]
        pytest.fail(f"{' '.join(cmd[:8])}... failed ({out.returncode}):\n" + "\n".join(lines[-60:]))


def train_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"}


def final_weights(run_dir: Path, sub: str = "") -> dict[str, torch.Tensor]:
    files = sorted((run_dir / "final" / sub).glob("*.safetensors"))
    assert files, f"no safetensors in {run_dir / 'final' / sub}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def assert_weights_close(a: dict, b: dict, atol: float, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different tensor names"
    for name in a:
        diff = (a[name].float() - b[name].float()).abs().max().item()
        assert diff <= atol, f"{what}: {name} differs by {diff:.3e} > {atol:.1e}"


def assert_same_curve(one: dict, two: dict, keys: list[str], steps: list[int]) -> None:
    for step in steps:
        for k in keys:
            a, b = one[step][k], two[step][k]
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), f"step {step} {k}: {a} vs {b}"


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun_sft")
    fastrlhf(1, "sft", root / "one", SFT)
    fastrlhf(2, "sft", root / "two", SFT)
    return root


def test_sft_two_processes_match_one(sft_runs):
    one, two = train_rows(sft_runs / "one"), train_rows(sft_runs / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert_same_curve(one, two, ["loss"], [1, 2, 3, 4])
    assert_same_curve(one, two, ["grad_norm"], [1])
    assert one[4]["loss"] < one[1]["loss"]  # it trains
    # Adam moves rounding-level gradient differences by up to lr per step
    assert_weights_close(final_weights(sft_runs / "one"), final_weights(sft_runs / "two"),
                         4 * 3e-3, "final weights")  # fmt: skip
    log = (sft_runs / "two" / "sft_2proc.log").read_text()
    assert log.count("resumed from") == 0 and "Traceback" not in log


def _resume_from_step2(src: Path, dst: Path) -> Path:
    """A copy of ``src``'s run dir as it was when step 2's checkpoint had landed."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_00000004")
    shutil.rmtree(dst / "final")
    assert (dst / "checkpoints" / "step_00000002" / "dcp" / ".metadata").is_file()
    return dst


@pytest.mark.parametrize("nproc", [2, 1])
def test_sft_resumes_from_two_process_checkpoint(sft_runs, tmp_path, nproc):
    run = _resume_from_step2(sft_runs / "two", tmp_path / "resumed")
    fastrlhf(nproc, "sft", run, SFT, "--resume")
    log = (run / f"sft_{nproc}proc.log").read_text()
    assert "resumed from" in log and "step 2" in log
    rows, uninterrupted = train_rows(run), train_rows(sft_runs / "two")
    assert sorted(rows) == [1, 2, 3, 4]  # steps 1-2 kept, 3-4 trained again
    if nproc == 2:  # same world size: every rank gets its own state back, bit for bit
        for step in (3, 4):
            assert rows[step]["loss"] == uninterrupted[step]["loss"]
        ours, ref = final_weights(run), final_weights(sft_runs / "two")
        assert all(torch.equal(ours[k], ref[k]) for k in ref)
    else:  # resharded onto one process
        assert_same_curve(uninterrupted, rows, ["loss"], [3, 4])
        assert_weights_close(final_weights(run), final_weights(sft_runs / "two"), 4 * 3e-3,
                             "resumed on 1 process")  # fmt: skip


def test_ppo_iteration_two_processes_match_one(tmp_path):
    fastrlhf(1, "ppo", tmp_path / "one", PPO)
    fastrlhf(2, "ppo", tmp_path / "two", PPO)
    one, two = train_rows(tmp_path / "one"), train_rows(tmp_path / "two")
    keys = ["reward_mean", "reward_std", "response_length", "kl", "advantage_mean",
            "policy_loss", "value_loss", "approx_kl", "entropy", "grad_norm",
            "value/grad_norm", "explained_variance", "updates"]  # fmt: skip
    assert all(k in one[1] for k in keys), sorted(one[1])
    assert_same_curve(one, two, keys, [1])
    assert one[1]["updates"] == 2
    for sub in ("", "critic"):
        ours, ref = final_weights(tmp_path / "two", sub), final_weights(tmp_path / "one", sub)
        assert_weights_close(ours, ref, 2 * 2e-3, f"final {sub or 'policy'}")


@pytest.mark.parametrize("stage", ["rm", "dpo", "grpo"])
def test_other_stages_run_with_two_processes(tmp_path, stage):
    args = [*COMMON, "data.num_train=16", "train.max_steps=1", "train.eval_every=1",
            "train.batch_size=4", "train.micro_batch_tokens=64",
            "checkpoint.save_every=0"]  # fmt: skip
    if stage == "grpo":
        args += ["ppo.kind=grpo", "ppo.reward_fn=fastrlhf.trainers.rewards:arithmetic_reward",
                 "ppo.rollout_batch_size=2", "ppo.n_samples=2", "ppo.max_new_tokens=4"]  # fmt: skip
    fastrlhf(2, stage, tmp_path / "run", args)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {r["split"] for r in rows} >= {"train", "eval"}
    final = tmp_path / "run" / "final"
    if stage == "rm":  # the consolidated reward model, with its score statistics
        from fastrlhf.models import load_value_model

        rm = load_value_model(str(final), init_from_policy=False)
        assert rm.reward_std > 0 and sum(p.numel() for p in rm.parameters()) > 0
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(final)
        assert sum(p.numel() for p in model.parameters()) > 0
