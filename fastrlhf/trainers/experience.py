"""One scored rollout in the form the RL update consumes, and its advantages.

``Experience`` holds a rollout as packed tokens [N] for the forwards and, per response
token [R], its position, label, old / reference log-probs, value, advantage and return,
on the response layout (each sequence's response tokens, in order, with ``cu_resp``
[B + 1]: prompt tokens are absent, which for GAE is the same as masking them).
``Experience.select`` cuts mini-batches out of it.

Advantages, on the response layout:

- ``gae_advantages``: GAE through ``ops.packed_gae`` (the compiled extension) or, as the
  reference switch, the padded reverse loop; then a whitening over every rank's tokens;
- ``critic_free_advantages``: GRPO / Dr. GRPO / RLOO group baselines over the samples
  of each prompt, or REINFORCE++ (``ops.group_advantages``).

Legend: B = sequences, N = packed tokens, R = response tokens, T = longest response.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrlhf.distributed import DistContext


@dataclass
class Experience:
    """One rollout, scored, in the packed layout (all tensors on the device).

    The R response tokens are addressed by ``positions`` [R] into the N packed tokens:
    the hidden state at ``positions[j]`` predicts ``labels[j]``. Per-token fields below
    are [R], in the response layout ``cu_resp`` [B + 1]; ``cu_cpu`` / ``cu_resp_cpu`` are
    host copies used to cut mini-batches without a device sync.
    """

    input_ids: torch.Tensor  # [N]
    position_ids: torch.Tensor  # [N]
    cu_seqlens: torch.Tensor  # [B + 1] int32
    positions: torch.Tensor  # [R] int64
    labels: torch.Tensor  # [R] int64
    cu_resp: torch.Tensor  # [B + 1] int32
    old_logprobs: torch.Tensor  # [R]
    advantages: torch.Tensor | None = None  # [R], set by scoring
    ref_logprobs: torch.Tensor | None = None  # [R]
    values: torch.Tensor | None = None  # [R] critic values at scoring time
    returns: torch.Tensor | None = None  # [R] GAE returns (PPO)
    cu_cpu: torch.Tensor | None = None  # [B + 1] int64 on the host
    cu_resp_cpu: torch.Tensor | None = None  # [B + 1] int64 on the host

    @classmethod
    def from_rollout(cls, rollout) -> Experience:
        """The response layout of a ``fastrlhf.rollout.Rollout`` (generation log-probs as the
        old ones; no advantages yet)."""
        tb = rollout.to_training_batch()
        positions = tb.loss_mask.nonzero().squeeze(1)  # [R]; host sync (sizes the output)
        resp_lens = rollout.response_lens.long()  # [B]
        cu_resp = torch.zeros(resp_lens.numel() + 1, dtype=torch.int32, device=positions.device)
        cu_resp[1:] = resp_lens.cumsum(0)
        return cls(
            input_ids=tb.input_ids,
            position_ids=tb.position_ids,
            cu_seqlens=tb.cu_seqlens,
            positions=positions,
            labels=tb.labels[positions],
            cu_resp=cu_resp,
            old_logprobs=tb.old_logprobs[positions],
            cu_cpu=tb.cu_seqlens.long().cpu(),
            cu_resp_cpu=cu_resp.long().cpu(),
        )

    @property
    def num_seqs(self) -> int:
        return self.cu_cpu.numel() - 1

    def seq_lens(self) -> list[int]:
        return self.cu_cpu.diff().tolist()

    @property
    def max_seqlen(self) -> int:
        return int(self.cu_cpu.diff().max())

    def select(self, seqs: list[int]) -> Experience:
        """The sub-rollout of sequences ``seqs`` (in that order), re-packed."""
        tok = torch.cat([torch.arange(self.cu_cpu[s], self.cu_cpu[s + 1]) for s in seqs])
        resp = torch.cat([torch.arange(self.cu_resp_cpu[s], self.cu_resp_cpu[s + 1]) for s in seqs])
        lens = self.cu_cpu.diff()[seqs]
        rlens = self.cu_resp_cpu.diff()[seqs]
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        cu_r = torch.cat([torch.zeros(1, dtype=torch.long), rlens.cumsum(0)])
        # each response token keeps its offset inside its sequence
        seq_of_resp = torch.repeat_interleave(torch.arange(len(seqs)), rlens)  # [R_sub]
        old_start = self.cu_cpu[seqs][seq_of_resp]
        dev = self.input_ids.device
        resp_d, tok_d = resp.to(dev), tok.to(dev)
        positions = self.positions[resp_d] - old_start.to(dev) + cu[:-1][seq_of_resp].to(dev)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[resp_d]

        return Experience(
            input_ids=self.input_ids[tok_d],
            position_ids=self.position_ids[tok_d],
            cu_seqlens=cu.to(dev, torch.int32),
            positions=positions,
            labels=take(self.labels),
            cu_resp=cu_r.to(dev, torch.int32),
            old_logprobs=take(self.old_logprobs),
            advantages=take(self.advantages),
            ref_logprobs=take(self.ref_logprobs),
            values=take(self.values),
            returns=take(self.returns),
            cu_cpu=cu,
            cu_resp_cpu=cu_r,
        )


def consecutive_chunks(lengths: list[int], budget: int) -> list[list[int]]:
    """Sequence indices 0..B-1 cut, in order, into runs of <= ``budget`` tokens (a longer
    sequence gets a run of its own)."""
    out: list[list[int]] = [[]]
    used = 0
    for s, n in enumerate(lengths):
        if out[-1] and used + n > budget:
            out.append([])
            used = 0
        out[-1].append(s)
        used += n
    return out


# ---------------------------------------------------------------------------------------
# advantages (on the response layout: each sequence's response tokens, ``cu_resp``)


def gae_advantages(
    rewards: torch.Tensor,  # [R]
    values: torch.Tensor,  # [R]
    cu_resp: torch.Tensor,  # [B + 1] int32
    gamma: float,
    lam: float,
    *,
    whiten: bool = True,
    fused: bool = True,
    ctx: DistContext | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [R], returns [R]) by GAE over each sequence's response tokens.

    fused: the ``fastrlhf::packed_gae`` op; else the padded reverse loop over time steps.
    Whitening (one mean / std over the whole rollout: every rank's tokens when ``ctx`` is
    distributed) applies to the advantages only, after the returns are taken (the critic
    regresses on unwhitened returns).
    """
    from fastrlhf.distributed import global_masked_whiten
    from fastrlhf.ops.advantages import packed_gae

    if fused:
        adv, ret = packed_gae(rewards, values, cu_resp, gamma=gamma, lam=lam)
    else:
        from fastrlhf.ops.advantages import unpack_to_padded
        from fastrlhf.ops.reference.advantages import padded_gae_reference

        r = unpack_to_padded(rewards.float(), cu_resp, 0.0)  # [B, T]
        v = unpack_to_padded(values.float(), cu_resp, 0.0)  # [B, T]
        m = unpack_to_padded(torch.ones_like(rewards, dtype=torch.bool), cu_resp, False)
        adv_p, _ = padded_gae_reference(r, v, m, gamma, lam)  # [B, T]
        seq = sequence_ids(cu_resp, rewards.numel())  # [R]
        pos = torch.arange(rewards.numel(), device=rewards.device) - cu_resp.long()[seq]
        adv = adv_p[seq, pos]  # [R]
        ret = adv + values.float()
    return (global_masked_whiten(adv, None, ctx or DistContext()) if whiten else adv), ret


def critic_free_advantages(
    kind: str,
    scores: torch.Tensor,  # [B]
    group_ids: torch.Tensor,  # [B]
    cu_resp: torch.Tensor,  # [B + 1] int32
    *,
    token_rewards: torch.Tensor | None = None,  # [R], e.g. -beta * k1
    gamma: float = 1.0,
    ctx: DistContext | None = None,
) -> torch.Tensor:
    """Per-token advantages [R] of GRPO / Dr. GRPO / RLOO (one value per sequence,
    broadcast to its tokens; a per-token KL penalty is summed into the sequence score)
    or REINFORCE++ (discounted per-token returns, whitened).

    With several processes each rank holds whole groups (the trainer splits a step's
    prompts, never a prompt's samples), so group baselines stay local; REINFORCE++'s
    whitening is over every rank's tokens."""
    from fastrlhf.ops.advantages import group_advantages

    if kind == "reinforce++":
        # several processes: the returns here, whitened over every rank's tokens
        distributed = ctx is not None and ctx.distributed
        adv = group_advantages(
            scores,
            kind=kind,
            cu_seqlens=cu_resp,
            gamma=gamma,
            token_rewards=token_rewards,
            whiten=not distributed,
        )
        if distributed:
            from fastrlhf.distributed import global_masked_whiten

            adv = global_masked_whiten(adv, None, ctx)
        return adv
    if token_rewards is not None:
        seq_sums = torch.zeros_like(scores).index_add_(
            0, sequence_ids(cu_resp, token_rewards.numel()), token_rewards.to(scores.dtype)
        )
        scores = scores + seq_sums
    return group_advantages(scores, group_ids, kind=kind, cu_seqlens=cu_resp)


def sequence_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    """[total] the sequence of every token of a packed layout ``cu`` [B + 1]."""
    cu = cu.long()
    return torch.repeat_interleave(
        torch.arange(cu.numel() - 1, device=cu.device), cu.diff(), output_size=total
    )
