"""A non-finite value stops a run before it can do harm, for every stage.

A NaN is injected into the trained model's output during one optimizer step (``BAD``),
which lies inside a logging window (log_every=2: windows [1, 2] and [3, 4]) while a
checkpoint is written after every step. Whatever the stage, the run must:

- exit with status 1, naming the step and the metric;
- apply no optimizer step from then on (the weights are those after step BAD - 1);
- write no checkpoint holding the NaN (the latest one is step BAD - 1, all finite).

The injection is stage-agnostic: a global forward hook on the policy / value model class
(only in forwards that build a graph, i.e. training, not generation, scoring or eval) and
a global optimizer-step hook that counts the steps applied.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

BAD = 3  # the optimizer step whose forward returns NaN


class _Injector:
    """NaN into the output of ``target`` modules during optimizer step BAD (1-based)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.steps: dict[int, int] = {}  # optimizer id -> steps applied
        self.module: torch.nn.Module | None = None
        self.before: dict[str, torch.Tensor] | None = None

    def done(self) -> int:
        return max(self.steps.values(), default=0)

    def on_step(self, optimizer, args, kwargs) -> None:
        # a fused AdamW step with ``found_inf`` set was skipped on the device (StepGuard)
        found_inf = getattr(optimizer, "found_inf", None)
        applied = found_inf is None or not bool(found_inf)
        self.steps[id(optimizer)] = self.steps.get(id(optimizer), 0) + int(applied)

    def on_forward(self, module, args, output):
        if type(module).__name__ != self.target or not torch.is_grad_enabled():
            return None
        if self.done() != BAD - 1:
            return None
        if self.module is None:  # the weights as step BAD found them
            self.module = module
            self.before = {n: p.detach().clone() for n, p in module.named_parameters()}
        return output * float("nan")


@pytest.fixture
def injector(request):
    inj = _Injector(request.param)
    h1 = torch.nn.modules.module.register_module_forward_hook(inj.on_forward)
    h2 = register_optimizer_step_post_hook(inj.on_step)
    yield inj
    h1.remove()
    h2.remove()


COMMON = [
    "train.max_steps=5",
    "train.eval_every=0",
    "logging.log_every=2",
    "checkpoint.save_every=1",
    "checkpoint.keep_last=10",
    "train.progress_bar=false",
    "train.cpu_threads=1",
    "logging.plots=false",
    "data.num_train=32",
    "data.num_eval=4",
    "data.max_length=40",
    "data.max_prompt_length=20",
    "train.micro_batch_tokens=96",
]

PPO = [
    "ppo.kind=ppo",
    "ppo.reward_fn=fastrlhf.trainers.rewards:arithmetic_reward",
    "ppo.rollout_batch_size=2",
    "ppo.max_new_tokens=3",
    "ppo.eval_max_new_tokens=3",
]

STAGES = {
    "sft": ("PolicyModel", ["train.batch_size=4"]),
    "rm": ("ValueModel", ["train.batch_size=4"]),
    "dpo": ("PolicyModel", ["train.batch_size=4", "dpo.reference=online"]),
    "ppo": ("PolicyModel", PPO),
    # fused AdamW: the check stays on the device (the step is skipped there, no host sync)
    "ppo-fused": ("PolicyModel", [*PPO, "optim.impl=fused"]),
}


def _check_checkpoints(run_dir: Path) -> None:
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [int(p.name.split("_")[1]) for p in ckpts] == list(range(1, BAD))
    for ckpt in ckpts:
        files = sorted((ckpt / "model").rglob("*.safetensors"))
        assert files, ckpt
        for f in files:
            for k, v in load_file(str(f)).items():
                assert torch.isfinite(v).all(), f"{ckpt.name}/{f.name}:{k}"


@pytest.mark.parametrize(
    "stage, injector", [(s, t) for s, (t, _) in STAGES.items()], indirect=["injector"]
)
def test_nan_between_log_windows_stops_before_step_and_checkpoint(
    stage, injector, tmp_path, tiny_model_dir, capsys
):
    from fastrlhf.cli import main

    run_dir = tmp_path / stage
    command = stage.split("-")[0]
    args = [command, f"run_dir={run_dir}", f"model.name_or_path={tiny_model_dir}"]
    rc = main(args + COMMON + STAGES[stage][1])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"at step {BAD}" in err and "non-finite" in err, err
    metric = "policy_loss" if command == "ppo" else "loss"
    assert f"non-finite {metric} " in err, err
    # no optimizer step applied the NaN (nor any later one)
    assert injector.module is not None
    per_step = len(injector.steps)  # PPO: the policy's and the critic's optimizer
    assert sum(injector.steps.values()) == (BAD - 1) * per_step
    for n, p in injector.module.named_parameters():
        assert torch.equal(p.detach(), injector.before[n]), n
        assert math.isfinite(p.detach().abs().max().item()), n
    # no checkpoint was written at or after the bad step, and none holds a NaN
    _check_checkpoints(run_dir)
