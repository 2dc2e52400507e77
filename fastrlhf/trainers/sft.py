"""Supervised fine-tuning: response-only cross-entropy through the fused lm_head op.

For a step's packed micro-batches m with response tokens R_m (labels != -100):

    loss = -(sum_m sum_{t in R_m} log p(label_t | tokens < t)) / sum_m |R_m|

i.e. every response token of the step weighs the same, however the examples were packed
(the loop divides each micro-batch's sum by the global count). Log-probs come from
``fastrlhf.ops.linear_token_logprobs`` on the policy's final hidden states at the
response positions only, so neither prompt positions nor the [N, V] logits ever go
through the lm_head matmul.

Eval: the same per-token loss and its perplexity on held-out examples.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastrlhf.config import RunConfig
from fastrlhf.data.batch import collate_packed
from fastrlhf.distributed import DistContext
from fastrlhf.trainers.data_order import pack_indices
from fastrlhf.trainers.loading import load_policy_for, model_path
from fastrlhf.trainers.logprobs import loss_index, move_index, response_logprobs
from fastrlhf.trainers.loop import TrainResult, train
from fastrlhf.trainers.records import data_settings, stage_records
from fastrlhf.trainers.reporting import progress
from fastrlhf.trainers.supervised import MicroBatch, SupervisedStage


class SFTStage(SupervisedStage):
    name = "sft"

    def __init__(self, cfg: RunConfig, ctx: DistContext | None = None) -> None:
        from fastrlhf.data.formats import tokenize_sft

        super().__init__(cfg, ctx)
        path = model_path(cfg.model, cfg.run_dir)
        self.policy = load_policy_for(cfg, path, self.device, trainable=True)
        train_records, eval_records = stage_records(cfg.data, "sft")
        settings = data_settings(cfg.data, cfg.run_dir)
        self.train_seqs = tokenize_sft(train_records, self.policy.tokenizer, settings)
        self.eval_seqs = tokenize_sft(eval_records, self.policy.tokenizer, settings)
        if not self.train_seqs:
            raise ValueError(f"data.source={cfg.data.source!r} gave no SFT training examples")
        self._setup_training(self.policy)

    def example_lengths(self) -> list[int]:
        return [len(s.input_ids) for s in self.train_seqs]

    def _micro(self, seqs, indices: list[int]) -> MicroBatch:
        batch = collate_packed(seqs)
        index = move_index(loss_index(batch), self.device)
        return MicroBatch(
            batch=batch.to(self.device),
            indices=indices,
            units=batch.num_loss_tokens,
            num_tokens=batch.num_tokens,
            extra={"index": index},
        )

    def micro_batch(self, indices: list[int]) -> MicroBatch:
        return self._micro([self.train_seqs[i] for i in indices], indices)

    def loss_sum(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp = response_logprobs(self.policy, mb.batch, mb.extra["index"])  # [n]
        return -logp.sum(), {}

    def evaluate(self) -> dict[str, float]:
        if not self.eval_seqs:
            return {}
        lengths = [len(s.input_ids) for s in self.eval_seqs]
        nll = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        budget = self.cfg.train.micro_batch_tokens
        groups = pack_indices(list(range(len(lengths))), lengths, budget)
        for group in progress(groups, "sft eval", self.cfg.train.progress_bar):
            mb = self._micro([self.eval_seqs[i] for i in group], group)
            with self.forward_context():
                nll -= response_logprobs(self.policy, mb.batch, mb.extra["index"]).sum().double()
            tokens += mb.units
        loss = nll.item() / max(1, tokens)
        return {"loss": loss, "ppl": float(torch.tensor(loss).exp())}

    def save_model(self, path: Path) -> None:
        self.policy.save_pretrained(path)


def run(cfg: RunConfig, *, resume: bool = False, ctx: DistContext | None = None) -> TrainResult:
    return train(SFTStage(cfg, ctx), cfg, resume=resume)
