"""The shared loop's parts: schedule, data order, packing, global normalisation, NaN stop."""

from __future__ import annotations

import math

import pytest
import torch

from fastrlhf.config import OptimConfig
from fastrlhf.trainers.data_order import pack_indices, step_indices
from fastrlhf.trainers.loop import train
from fastrlhf.trainers.optim import lr_factor, matmul_params
from fastrlhf.trainers.supervised import accumulate_gradients


def test_lr_schedule_shapes():
    cfg = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, cfg, 20) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[4:], f[5:]))
    # cosine halfway between warmup end and the last step is the midpoint
    assert lr_factor(12, cfg, 20) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(20, cfg, 20) == pytest.approx(0.1)
    lin = OptimConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_factor(s, lin, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    const = OptimConfig(warmup_steps=2, schedule="constant")
    assert [lr_factor(s, const, 10) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_step_indices_are_epochs_of_permutations():
    n, bs = 10, 4
    order = [i for s in range(5) for i in step_indices(s, bs, n, seed=3)]  # 2 epochs
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert order[:10] != order[10:20]  # a new permutation each epoch
    assert step_indices(3, bs, n, seed=3) == order[12:16]  # a pure function of the step
    assert step_indices(0, bs, n, seed=4) != step_indices(0, bs, n, seed=3)


def test_pack_indices_respects_budget_and_keeps_everything():
    lengths = [5, 9, 3, 12, 7, 30, 1]
    idx = [6, 0, 5, 3, 1]
    bins = pack_indices(idx, lengths, 13)
    assert sorted(i for b in bins for i in b) == sorted(idx)
    assert [5] in bins  # longer than the budget: alone
    assert all(sum(lengths[i] for i in b) <= 13 for b in bins if b != [5])


def test_matmul_params_counts_tied_embedding_once():
    emb = torch.nn.Embedding(11, 4)
    head = torch.nn.Linear(4, 11, bias=False)
    head.weight = emb.weight
    m = torch.nn.ModuleDict({"emb": emb, "mid": torch.nn.Linear(4, 4), "head": head})
    assert matmul_params(m) == 44 + 20
    untied = torch.nn.ModuleDict({"emb": torch.nn.Embedding(11, 4), "mid": torch.nn.Linear(4, 4)})
    assert matmul_params(untied) == 20


def _grads(stage):
    return [p.grad.clone() for p in stage.module.parameters() if p.requires_grad]


def test_loss_is_normalised_by_the_global_token_count(small_config):
    """Splitting a step into more micro-batches must not change loss or gradients, and
    the loss must equal the per-token mean over the whole batch (not a mean of means)."""
    from fastrlhf.trainers.logprobs import response_logprobs
    from fastrlhf.trainers.sft import SFTStage

    stage = SFTStage(small_config("sft"))
    idx = list(range(12))
    one = [stage.micro_batch(idx)]
    many = [stage.micro_batch(g) for g in ([0, 1], [2, 3, 4, 5, 6], [7], [8, 9, 10, 11])]
    assert sum(m.units for m in many) == one[0].units
    loss_one, _ = accumulate_gradients(stage, one)
    g_one = _grads(stage)
    stage.module.zero_grad(set_to_none=True)
    loss_many, _ = accumulate_gradients(stage, many)
    g_many = _grads(stage)
    with torch.no_grad():
        mb = one[0]
        mean = -response_logprobs(stage.policy, mb.batch, mb.extra["index"]).double().mean()
        per_mb = [-response_logprobs(stage.policy, m.batch, m.extra["index"]).mean() for m in many]
    assert loss_one.item() == pytest.approx(mean.item(), rel=1e-5)
    assert loss_many.item() == pytest.approx(mean.item(), rel=1e-5)
    # a mean of per-micro-batch means is a different number here (so the test can fail)
    assert abs(torch.stack(per_mb).mean().item() - mean.item()) > 1e-3
    for a, b in zip(g_one, g_many):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_loss_stops_with_the_step(small_config):
    from fastrlhf.trainers.sft import SFTStage

    cfg = small_config("sft", "train.max_steps=5", "optim.lr=1e30", "optim.max_grad_norm=0")
    stage = SFTStage(cfg)
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step \d"):
        train(stage, cfg)
    # the step whose loss was not finite was not applied: the weights are still finite
    assert all(math.isfinite(p.detach().abs().max().item()) for p in stage.module.parameters())


def test_step_zero_eval_is_available_to_every_stage(small_config):
    from fastrlhf.metrics import read_metrics
    from fastrlhf.trainers.sft import SFTStage

    cfg = small_config("sft", "train.max_steps=1", "train.eval_at_start=true")
    train(SFTStage(cfg), cfg)
    rows = read_metrics(f"{cfg.run_dir}/metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 1]
    # the supervised default: no baseline (their metrics.jsonl stays as it was)
    cfg = small_config("sft", "train.max_steps=1", "run_dir=" + cfg.run_dir + "_default")
    train(SFTStage(cfg), cfg)
    rows = read_metrics(f"{cfg.run_dir}/metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "eval"] == [1]


def test_package_modules_are_short_and_acyclic():
    """Each file under fastrlhf/ readable in one sitting; no import cycle between its
    modules (lazy imports inside functions count too; a package importing its own
    submodules, or a submodule its package, is not a cycle)."""
    import ast
    from pathlib import Path

    import fastrlhf

    root = Path(fastrlhf.__file__).parent
    names = {}
    for f in root.rglob("*.py"):
        assert len(f.read_text().splitlines()) <= 600, f
        parts = ("fastrlhf", *f.relative_to(root).with_suffix("").parts)
        names[".".join(parts[:-1] if f.stem == "__init__" else parts)] = f
    graph = {m: set() for m in names}
    for m, f in names.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in names:
                    t = t.rpartition(".")[0]
                if t and t != m and not m.startswith(t + ".") and not t.startswith(m + "."):
                    graph[m].add(t)

    def reaches(a: str, b: str, seen: set) -> bool:
        return a == b or any(n not in seen and reaches(n, b, seen | {n}) for n in graph[a])

    cycles = [(a, b) for a in graph for b in graph[a] if reaches(b, a, {b})]
    assert not cycles, cycles
