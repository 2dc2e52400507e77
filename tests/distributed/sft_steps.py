"""A few SFT steps on the embedded tiny Llama, shared by the 1-process run (inside pytest,
no process group) and the torchrun workers, so both execute the very same code.

One step: the step's examples (a seeded permutation, as the trainer loop draws them) are
packed into token-balanced micro-batches per rank; each micro-batch's summed response
log-probs (fused lm_head op on the policy's hidden states, trainer code) are divided by
the GLOBAL response-token count; gradients accumulate, are clipped, AdamW steps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastrlhf.data.batch import collate_packed
from fastrlhf.distributed import (
    DistContext,
    all_reduce_sum,
    clip_grad_norm_,
    full_state_dict,
    global_token_count,
    rank_micro_batches,
    shard_model,
)

STEPS = 3
BATCH_SIZE = 8
MICRO_BATCH_TOKENS = 24  # ~2 micro-batches per rank with 2 ranks, ~4 with one
NUM_EXAMPLES = 40
LR = 1e-3
MAX_GRAD_NORM = 1.0
SEED = 0


def examples(tokenizer) -> list:
    from fastrlhf.data.embedded import ArithmeticTask
    from fastrlhf.data.formats import tokenize_sft

    return tokenize_sft(ArithmeticTask(SEED).sft_records(NUM_EXAMPLES), tokenizer)


def build(model_dir: str | Path, ctx: DistContext):
    """(policy, optimizer, examples): the policy sharded when ``ctx`` is distributed."""
    from fastrlhf.models import load_policy

    policy = load_policy(str(model_dir), dtype="float32", device=ctx.device)
    policy.train()
    shard_model(policy, ctx)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.01, foreach=True)
    return policy, optimizer, examples(policy.tokenizer)


def train_step(step: int, policy, optimizer, seqs: list, ctx: DistContext) -> dict[str, float]:
    """Optimizer step ``step`` (0-based); returns the global loss and gradient norm."""
    from fastrlhf.trainers.data_order import step_indices
    from fastrlhf.trainers.logprobs import loss_index, response_logprobs

    lengths = [len(s.input_ids) for s in seqs]
    indices = step_indices(step, BATCH_SIZE, len(seqs), SEED)
    mine = rank_micro_batches(indices, lengths, MICRO_BATCH_TOKENS, ctx)
    batches = [collate_packed([seqs[i] for i in group]).to(ctx.device) for group in mine]
    units = global_token_count(sum(b.num_loss_tokens for b in batches), ctx)
    local = torch.zeros((), device=ctx.device)
    for batch in batches:
        logp = response_logprobs(policy, batch, loss_index(batch))  # [n]
        loss = -logp.sum() / units
        loss.backward()
        local += loss.detach()
    norm = clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": all_reduce_sum(local, ctx).item(),
        "grad_norm": float(norm),
        "micro_batches": len(batches),
    }


def weights(policy, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Full fp32 weights (rank 0; {} elsewhere), cloned so later steps cannot alter them."""
    return {k: v.detach().clone() for k, v in full_state_dict(policy, ctx).items()}
