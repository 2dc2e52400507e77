"""Reward model: eval metrics against brute force, the Bradley-Terry loss, and the reward
normalisation statistics stored with the saved model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fastrlhf.trainers.loop import train
from fastrlhf.trainers.rm import RMStage, expected_calibration_error, preference_metrics, roc_auc


def test_roc_auc_matches_pairwise_count():
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(37, generator=g) + 0.5
    neg = torch.randn(23, generator=g)
    pos[:5] = neg[:5]  # ties count one half
    brute = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(pos, neg) == pytest.approx(brute.item(), abs=1e-12)
    assert roc_auc(torch.ones(3), torch.zeros(4)) == 1.0


def test_ece_by_hand():
    prob = torch.tensor([0.05, 0.15, 0.95, 0.9, 0.55], dtype=torch.float64)
    label = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    # bins of width 0.5: [0.05, 0.15] -> conf 0.1, acc 0.5; [0.95, 0.9, 0.55] -> 0.8, 2/3
    expected = 2 / 5 * abs(0.5 - 0.1) + 3 / 5 * abs(2 / 3 - 0.8)
    assert expected_calibration_error(prob, label, 2) == pytest.approx(expected, abs=1e-12)


def test_preference_metrics():
    chosen = torch.tensor([2.0, 0.0, 1.0, -1.0])
    rejected = torch.tensor([1.0, 1.0, -1.0, -1.5])
    m = preference_metrics(chosen, rejected, bins=10)
    assert m["accuracy"] == 0.75
    assert m["margin"] == pytest.approx((1 - 1 + 2 + 0.5) / 4)
    assert 0 <= m["ece"] <= 1 and 0 <= m["auc"] <= 1


def test_bradley_terry_loss_and_stats(small_config, tmp_path):
    cfg = small_config(
        "rm", "train.max_steps=3", "rm.margin=0.25", "checkpoint.save_final=true",
        "optim.lr=1e-3",
    )  # fmt: skip
    stage = RMStage(cfg)
    mb = stage.micro_batch([0, 5, 9])
    loss, sums = stage.loss_sum(mb)
    # independent: score each sequence alone (value at its last token)
    with torch.no_grad():
        scores = []
        for i in [0, 5, 9]:
            p = stage.train_pairs[i]
            for resp in (p.chosen_ids, p.rejected_ids):
                ids = torch.tensor(p.prompt_ids + resp)
                n = len(ids)
                v = stage.model(ids, torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n)
                scores.append(v[-1])
        s = torch.stack(scores).view(3, 2)
    expected = -F.logsigmoid(s[:, 0] - s[:, 1] - 0.25).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert sums["accuracy"].item() == float((s[:, 0] > s[:, 1]).sum())

    result = train(stage, cfg)
    assert {"accuracy", "auc", "margin", "ece"} <= set(result.eval_metrics)
    stats = json.loads((result.final_dir / "value_head.json").read_text())
    # the stored statistics are those of the trained model's scores on the training pairs
    from fastrlhf.models import ValueModel

    reloaded = ValueModel.from_pretrained(result.final_dir)
    stage.model = stage.module = reloaded.train()
    c, r = stage._all_scores(stage.train_pairs)
    scores = torch.cat([c, r]).double()
    assert stats["reward_mean"] == pytest.approx(scores.mean().item(), rel=1e-5, abs=1e-6)
    assert stats["reward_std"] == pytest.approx(scores.std().item(), rel=1e-5)
    assert stats["reward_std"] > 0
