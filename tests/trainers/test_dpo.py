"""DPO: reference handling (precomputed, online, adapter-off, none) and the loss at init."""

from __future__ import annotations

import math

import pytest
import torch

from fastrlhf.trainers.dpo import DPOStage
from fastrlhf.trainers.loop import train
from fastrlhf.trainers.supervised import accumulate_gradients


def _grads(stage):
    return [p.grad.clone() for p in stage.module.parameters() if p.grad is not None]


def test_precomputed_and_online_reference_agree(small_config, tmp_path):
    pre = DPOStage(small_config("dpo", "dpo.reference=precompute"))
    assert pre.ref is None and pre.ref_tables["train"].shape == (64, 2)
    online = DPOStage(small_config("dpo", "dpo.reference=online", f"run_dir={tmp_path / 'online'}"))
    assert online.ref is not None and not online.ref_tables
    idx = [1, 4, 2, 9, 30]
    mbs = [[pre.micro_batch(idx[:2]), pre.micro_batch(idx[2:])]]
    loss_pre, sums = accumulate_gradients(pre, mbs[0])
    loss_on, _ = accumulate_gradients(online, [online.micro_batch(idx)])
    # policy == reference at init: h = 0, so the sigmoid loss is log 2 and rewards are 0
    assert loss_pre.item() == pytest.approx(math.log(2), abs=1e-5)
    assert loss_on.item() == pytest.approx(loss_pre.item(), abs=1e-6)
    assert abs(sums["reward_margin"].item()) < 1e-4
    for a, b in zip(_grads(pre), _grads(online)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # the table holds the reference's summed response log-probs
    mb = pre.micro_batch([1, 4])
    with torch.no_grad():
        direct = pre._seq_logps(pre.policy, mb)
    torch.testing.assert_close(
        pre.ref_tables["train"][[1, 4]], direct.float(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_reference_free_kinds_load_no_reference(small_config, kind):
    stage = DPOStage(small_config("dpo", f"dpo.kind={kind}", "dpo.beta=2.0"))
    assert stage.ref is None and not stage.ref_tables and not stage.needs_ref
    loss, sums = accumulate_gradients(stage, [stage.micro_batch([0, 1, 2])])
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert set(sums) == {"reward_accuracy", "reward_chosen", "reward_rejected", "reward_margin"}


def test_lora_policy_uses_adapter_off_reference_and_trains(small_config):
    cfg = small_config(
        "dpo", "model.lora_rank=4", "dpo.reference=online", "dpo.kind=ipo",
        "train.max_steps=3", "optim.lr=1e-2", "train.eval_every=3",
    )  # fmt: skip
    stage = DPOStage(cfg)
    assert stage.ref is None and stage.policy.has_lora  # no second model in memory
    result = train(stage, cfg)
    m = result.eval_metrics
    assert set(m) == {
        "loss",
        "reward_accuracy",
        "reward_chosen",
        "reward_rejected",
        "reward_margin",
    }
    # after training the adapter, policy and reference differ
    assert abs(m["reward_chosen"]) + abs(m["reward_rejected"]) > 0
