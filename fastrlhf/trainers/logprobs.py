"""Log-probs of response tokens through the fused lm_head op, for every stage.

A packed batch (``PackedBatch`` or an RL ``Experience``: input_ids, position_ids,
cu_seqlens, max_seqlen over N tokens) and an index of its R response tokens (``positions``
[R] into the N tokens, whose hidden state predicts ``labels`` [R]) give log p(label) [R]
and, for RL, the entropies. Only the R hidden states reach the lm_head, and with the
fused op the [R, V] logits never exist.

Legend: N = packed tokens, R = response (loss) tokens, B = sequences, H = hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrlhf.data.batch import IGNORE_INDEX, PackedBatch


@dataclass
class LossIndex:
    """Where the loss tokens of a packed batch are: [R] positions, labels and sequence."""

    positions: torch.Tensor  # [R] int64 indices into the N packed tokens
    labels: torch.Tensor  # [R] int64 the token each position predicts
    seq_ids: torch.Tensor  # [R] int64 sequence of each loss token


def loss_index(batch: PackedBatch) -> LossIndex:
    """Computed on the CPU copy of the batch, so selecting rows later needs no host sync."""
    positions = (batch.labels != IGNORE_INDEX).nonzero().squeeze(1)  # [R]
    seq_of_token = torch.repeat_interleave(
        torch.arange(batch.num_seqs), batch.seq_lens.long()
    )  # [N]
    return LossIndex(positions, batch.labels[positions], seq_of_token[positions])


def move_index(index: LossIndex, device: torch.device) -> LossIndex:
    return LossIndex(index.positions.to(device), index.labels.to(device), index.seq_ids.to(device))


def response_logprobs(
    policy,
    packed,
    index,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    fused: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(label) at the R response tokens [R] of ``packed`` (``index``: anything with
    ``positions`` and ``labels``), and their entropies [R] when ``entropy``.

    fused: ``ops.linear_token_logprobs`` (no [R, V] logits); else the reference, which
    materialises the logits and their log_softmax (the benchmark comparison).
    """
    hidden = policy(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
    h = hidden.index_select(0, index.positions)  # [R, H]
    # the policy's own head, post-head transform (soft-cap, logit scale) included;
    # validate=False inside: a bad label gives NaN, which the non-finite check turns into
    # an error naming the step
    return policy.token_logprobs(
        h, index.labels, temperature, return_entropy=entropy, reference=not fused
    )


def sequence_sums(values: torch.Tensor, index: LossIndex, num_seqs: int) -> torch.Tensor:
    """[B] per-sequence sums of per-loss-token ``values`` [R]."""
    out = torch.zeros(num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add(0, index.seq_ids, values)
