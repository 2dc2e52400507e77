"""Reward model: eval metrics against brute force, the Bradley-Terry loss, and the reward
normalisation statistics stored with the saved model."""

from __future__ import annotations

import json
import math

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


def test_ranking_loss_against_float64_by_hand():
    from fastrlhf.trainers.rm import ranking_loss_sum

    # groups of 3, 1 and 6 pairs (rankings of K = 3, 2 and 4 responses)
    g = torch.Generator().manual_seed(3)
    margin = torch.randn(10, generator=g) * 3
    group = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2, 2])
    m, t = margin.double().tolist(), 0.3
    nll = [math.log1p(math.exp(-(x - t))) for x in m]  # -log sigmoid(x - t)
    expected = (sum(nll[:3]) / 3 + nll[3] + sum(nll[4:]) / 6) / 3
    got = ranking_loss_sum(margin, group, t) / 3
    assert got.item() == pytest.approx(expected, rel=1e-6)
    got64 = ranking_loss_sum(margin.double(), group, t) / 3
    assert got64.item() == pytest.approx(expected, rel=1e-12)
    # gradient: pair p gets -sigmoid(-(m_p - t)) / (|group(p)| * G)
    x = margin.double().requires_grad_()
    (ranking_loss_sum(x, group, t) / 3).backward()
    size = torch.tensor([3.0] * 3 + [1.0] + [6.0] * 6, dtype=torch.float64)
    want = -torch.sigmoid(-(margin.double() - t)) / (size * 3)
    torch.testing.assert_close(x.grad, want, rtol=1e-12, atol=0)


def _ranking_rows(n_items: int) -> list[dict]:
    """Rows as ``fastrlhf feedback export`` writes them: rankings of K = 2..4 responses, all
    K(K-1)/2 pairs of one item sharing its group id, plus two rows without a group."""
    rows = []
    for item in range(n_items):
        k = 2 + item % 3
        responses = [f" answer {item}-{j}" + " ok" * j for j in range(k)]
        for i in range(k):
            for j in range(i + 1, k):
                rows.append(
                    {"prompt": f"Question {item}:", "chosen": responses[i],
                     "rejected": responses[j], "group": f"item-{item}", "item_id": f"item-{item}"}
                )  # fmt: skip
    rows += [{"prompt": "Alone:", "chosen": " yes", "rejected": " no"}] * 2
    return rows


def test_ranking_stage_batches_groups(small_config, tmp_path):
    from fastrlhf.trainers.rm import ranking_loss_sum

    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _ranking_rows(9)))
    cfg = small_config(
        "rm", "rm.loss=ranking", f"data.source={path}", "data.num_eval=0", "train.max_steps=1"
    )
    stage = RMStage(cfg)
    sizes = sorted(len(g) for g in stage.groups)
    assert len(stage.groups) == 11 and sizes == [1, 1, 1, 1, 1, 3, 3, 3, 6, 6, 6]
    for g in stage.groups:  # a group's pairs share the prompt (one ranking)
        assert len({tuple(stage.train_pairs[i].prompt_ids) for i in g}) == 1
    mb = stage.micro_batch([0, 1, 2])
    assert mb.units == 3
    loss, sums = stage.loss_sum(mb)
    chosen, rejected = stage._scores(mb)
    group = torch.repeat_interleave(
        torch.arange(3), torch.tensor([len(stage.groups[i]) for i in range(3)])
    )
    assert loss.item() == pytest.approx(ranking_loss_sum(chosen - rejected, group).item(), rel=1e-6)
    # the pairwise loss on the same pairs weighs them equally instead
    pair = RMStage(small_config("rm", f"data.source={path}", "data.num_eval=0"))
    flat = [i for g in stage.groups[:3] for i in g]
    ploss, _ = pair.loss_sum(pair.micro_batch(flat))
    assert ploss.item() == pytest.approx(-F.logsigmoid(chosen - rejected).sum().item(), rel=1e-5)


def test_rm_ranking_cli_run(tmp_path, tiny_model_dir):
    from fastrlhf.cli import main

    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _ranking_rows(12)))
    run = tmp_path / "run"
    argv = ["rm", f"run_dir={run}", f"model.name_or_path={tiny_model_dir}", f"data.source={path}",
            "rm.loss=ranking", "data.num_eval=4", "data.max_length=40",
            "data.max_prompt_length=20", "train.batch_size=4",
            "train.micro_batch_tokens=96", "train.max_steps=2", "train.progress_bar=false",
            "train.cpu_threads=1", "logging.log_every=1", "logging.plots=false",
            "checkpoint.save_final=false"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r and math.isfinite(r["loss"])]
    assert len(train_rows) >= 2
    assert all(0 <= r["accuracy"] <= 1 for r in train_rows if "accuracy" in r)
