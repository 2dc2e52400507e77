"""Reward model: Bradley-Terry on preference pairs, or on the pairs of rankings.

A ValueModel scores each packed sequence by its value at the last token: r = score(seq).
For a pair (chosen c, rejected r) with margin m = r_c - r_r the loss is

    l = -log sigmoid(m - margin_target)      (margin_target = rm.margin, default 0)

``rm.loss=pairwise`` (default): an example is a pair; l is summed over the step's pairs and
divided by their global count (see supervised.py).

``rm.loss=ranking`` (InstructGPT): an example is a group, the rows sharing a ``group`` id
(the K(K-1)/2 pairs that ``fastrlhf feedback export`` writes for one ranking of K
responses; a row without one is a group of one pair). All pairs of a group go into the
same micro-batch, and the loss is the mean over the step's groups of the mean of l over
the group's pairs, so a ranking of 9 responses weighs as much as one of 2. Training
metrics (accuracy, margin) are averaged the same way. Simplification: each pair is
scored as its own two sequences, so a response in several pairs of a group is run once
per pair (K-1 times) rather than once per group; the loss is the same, the cost higher.
Evaluation is pairwise either way.

Eval on held-out pairs: accuracy P(m > 0), ROC AUC of chosen-vs-rejected scores
(Mann-Whitney U, ties count half), mean margin, and the expected calibration error of
sigmoid(m) as the probability that the chosen response is preferred (each pair is
counted both ways, (sigmoid(m), 1) and (sigmoid(-m), 0), so the ECE is not trivially
about one class). After training, the mean and std of the scores of all training
sequences are stored with the model (``reward_mean`` / ``reward_std``) for PPO.

Legend: P = pairs, B = 2P sequences (2i chosen, 2i+1 rejected), N = packed tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fastrlhf.config import RunConfig
from fastrlhf.data.batch import collate_pairs
from fastrlhf.distributed import DistContext
from fastrlhf.trainers.data_order import pack_indices
from fastrlhf.trainers.loading import model_path, weights_dtype
from fastrlhf.trainers.loop import TrainResult, train
from fastrlhf.trainers.records import data_settings, stage_records
from fastrlhf.trainers.reporting import progress
from fastrlhf.trainers.supervised import MicroBatch, SupervisedStage


def roc_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie), exactly, by ranks."""
    scores = torch.cat([pos, neg]).double()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(ranks)
    )
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = len(pos), len(neg)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def expected_calibration_error(prob: torch.Tensor, label: torch.Tensor, bins: int) -> float:
    """sum_b |B_b|/n * |mean(label in b) - mean(prob in b)| over equal-width bins of prob."""
    prob, label = prob.double(), label.double()
    which = (prob * bins).long().clamp_(0, bins - 1)
    conf = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, prob)
    acc = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, label)
    return float(((acc - conf).abs()).sum() / max(1, len(prob)))


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor, bins: int) -> dict:
    """Accuracy, ROC AUC, mean margin and ECE of scores [P] of chosen / rejected responses."""
    margin = (chosen - rejected).double()  # [P]
    p = torch.sigmoid(margin)
    probs = torch.cat([p, 1 - p])
    labels = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    return {
        "accuracy": float((margin > 0).double().mean()),
        "auc": roc_auc(chosen, rejected),
        "margin": float(margin.mean()),
        "ece": expected_calibration_error(probs, labels, bins),
        "chosen_score": float(chosen.double().mean()),
        "rejected_score": float(rejected.double().mean()),
    }


def preference_groups(pairs) -> list[list[int]]:
    """Indices of ``pairs`` grouped by their ``group`` id (meta["group"]), groups in order of
    first appearance; a pair without a group id is a group of its own."""
    by_id: dict[str, list[int]] = {}
    groups: list[list[int]] = []
    for i, pair in enumerate(pairs):
        gid = (pair.meta or {}).get("group")
        if gid is None:
            groups.append([i])
            continue
        key = repr(gid)  # 3 and "3" are different groups, as the JSON says
        if key not in by_id:
            by_id[key] = []
            groups.append(by_id[key])
        by_id[key].append(i)
    return groups


def ranking_loss_sum(
    margin: torch.Tensor, group: torch.Tensor, target: float = 0.0
) -> torch.Tensor:
    """sum over groups g of mean over g's pairs p of -log sigmoid(margin_p - target).

    margin [P]: r_chosen - r_rejected per pair; group [P]: each pair's group, ids 0..G-1
    (every id present). Divided by the number of groups (the loop's unit count) it is
    InstructGPT's ranking loss: every group weighs the same whatever its K."""
    size = torch.bincount(group).to(margin.dtype)  # [G]
    per_pair = -F.logsigmoid(margin - target)  # [P]
    return (per_pair / size[group]).sum()


class RMStage(SupervisedStage):
    name = "rm"

    def __init__(self, cfg: RunConfig, ctx: DistContext | None = None) -> None:
        from fastrlhf.data.formats import tokenize_preferences
        from fastrlhf.models import load_value_model

        super().__init__(cfg, ctx)
        if cfg.model.lora_rank:
            raise ValueError("model.lora_rank: LoRA reward models are not supported; set it to 0")
        m = cfg.model
        self.model = load_value_model(
            model_path(m, cfg.run_dir),
            dtype=weights_dtype(m),
            device=self.device,
            init_from_policy=True,
            trust_remote_code=m.trust_remote_code,
            gradient_checkpointing=m.gradient_checkpointing,
            attn_impl=m.attn_impl,
            attention=m.attention,
            batch_invariant_attention=m.attention_batch_invariant,
            seed=cfg.seed,
        )
        if self.model.tokenizer is None:
            raise ValueError(f"model.name_or_path={m.name_or_path!r} ships no tokenizer")
        train_records, eval_records = stage_records(cfg.data, "pairs")
        settings = data_settings(cfg.data, cfg.run_dir)
        tok = self.model.tokenizer
        self.train_pairs = tokenize_preferences(train_records, tok, settings)
        self.eval_pairs = tokenize_preferences(eval_records, tok, settings)
        if not self.train_pairs:
            raise ValueError(f"data.source={cfg.data.source!r} gave no preference pairs")
        # ranking: the training examples are groups of pair indices; pairwise: single pairs
        self.ranking = cfg.rm.loss == "ranking"
        self.groups = (
            preference_groups(self.train_pairs)
            if self.ranking
            else [[i] for i in range(len(self.train_pairs))]
        )
        self._setup_training(self.model)

    @staticmethod
    def _lengths(pairs) -> list[int]:
        return [2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]

    def example_lengths(self) -> list[int]:
        lengths = self._lengths(self.train_pairs)
        return [sum(lengths[i] for i in g) for g in self.groups]

    def _micro(self, pairs, indices: list[int]) -> MicroBatch:
        batch = collate_pairs(pairs)
        return MicroBatch(batch.to(self.device), indices, len(pairs), batch.num_tokens)

    def micro_batch(self, indices: list[int]) -> MicroBatch:
        if not self.ranking:
            return self._micro([self.train_pairs[i] for i in indices], indices)
        members = [self.groups[g] for g in indices]
        mb = self._micro([self.train_pairs[i] for m in members for i in m], indices)
        mb.units = len(indices)  # the loss unit is a group
        sizes = torch.tensor([len(m) for m in members])
        mb.extra["group"] = torch.repeat_interleave(torch.arange(len(members)), sizes).to(
            self.device
        )  # [P] group of each pair, 0..len(indices)-1
        return mb

    def _scores(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        b = mb.batch
        values = self.model(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen)  # [N]
        scores = self.model.sequence_scores(values, b.cu_seqlens)  # [2P]
        return scores[0::2], scores[1::2]

    def loss_sum(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self._scores(mb)  # [P], [P]
        margin = chosen - rejected
        if not self.ranking:
            loss = -F.logsigmoid(margin - self.cfg.rm.margin).sum()
            return loss, {
                "accuracy": (margin > 0).float().sum(),
                "margin": margin.detach().sum(),
            }
        group = mb.extra["group"]
        weight = 1.0 / torch.bincount(group).float()[group]  # [P] 1 / size of the pair's group
        loss = ranking_loss_sum(margin, group, self.cfg.rm.margin)
        return loss, {
            "accuracy": ((margin > 0).float() * weight).sum(),
            "margin": (margin.detach().float() * weight).sum(),
        }

    def _all_scores(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = [], []
        lengths = self._lengths(pairs)
        budget = self.cfg.train.micro_batch_tokens
        groups = pack_indices(list(range(len(pairs))), lengths, budget)
        for group in progress(groups, "rm scoring", self.cfg.train.progress_bar):
            with self.forward_context():
                c, r = self._scores(self._micro([pairs[i] for i in group], group))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        return torch.cat(chosen), torch.cat(rejected)

    def evaluate(self) -> dict[str, float]:
        if not self.eval_pairs:
            return {}
        chosen, rejected = self._all_scores(self.eval_pairs)
        return preference_metrics(chosen, rejected, self.cfg.rm.ece_bins)

    def finalize(self) -> None:
        chosen, rejected = self._all_scores(self.train_pairs)
        scores = torch.cat([chosen, rejected]).double()
        self.model.reward_mean = float(scores.mean())
        self.model.reward_std = float(scores.std()) if len(scores) > 1 else 1.0

    def save_model(self, path: Path) -> None:
        self.model.save_pretrained(path)


def run(cfg: RunConfig, *, resume: bool = False, ctx: DistContext | None = None) -> TrainResult:
    return train(RMStage(cfg, ctx), cfg, resume=resume)
