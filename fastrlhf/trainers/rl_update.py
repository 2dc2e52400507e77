"""Phase 3 of an RL iteration: ``ppo_epochs`` x ``num_mini_batches`` optimizer steps on a
scored rollout (``PolicyUpdate``, a part of ``fastrlhf.trainers.ppo.PPOStage``).

A mini-batch is packed into micro-batches of <= ``train.micro_batch_tokens`` tokens
whose losses are weighted by their share of the mini-batch's loss units (tokens for
token-mean, sequences otherwise), so packing does not change the result. Log-probs and
entropy come from ``ops.linear_token_logprobs`` on the policy's hidden states at
response positions (the [N, V] logits never exist); the loss is ``ops.ppo_policy_loss``
(decoupled clip_low / clip_high, optional dual clip, entropy bonus, token- or
sequence-level aggregation) plus ``vf_coef`` * ``ops.value_loss`` (clipped) for the
critic. Before each optimizer step the mini-batch's losses, gradient norms and metrics
are checked (``numerics.StepGuard``: on the device with fused AdamW, else one host sync):
a non-finite one never reaches the weights and ends the run naming the step. With
``target_kl > 0`` the update stops early once the approximate KL(old || new) exceeds it
(one host sync per mini-batch).

Legend: B = sequences, R = response tokens.
"""

from __future__ import annotations

import math

import torch

from fastrlhf.distributed import all_reduce_sum, clip_grad_norm_, global_max, global_token_count
from fastrlhf.trainers.data_order import pack_indices
from fastrlhf.trainers.experience import Experience
from fastrlhf.trainers.logprobs import response_logprobs


class PolicyUpdate:
    """Update methods of ``PPOStage`` (which holds the models, optimizers and configs)."""

    def micro_losses(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(policy loss, value loss, metrics) of a micro-batch, autograd-connected."""
        ppo, fused = self.ppo, self.ppo.fused_ops
        from fastrlhf.ops.losses import ppo_policy_loss, value_loss

        # cu_resp is built here, so its layout needs no check (that would be a host sync)
        backend = dict(impl="auto" if fused else "reference", validate=False)
        logp, entropy = response_logprobs(
            self.policy,
            exp,
            exp,
            temperature=self.gen_config.logprob_temperature,
            entropy=True,
            fused=fused,
        )
        in_loss = ppo.kl_placement == "loss" and exp.ref_logprobs is not None
        mask = torch.ones_like(exp.old_logprobs, dtype=torch.bool)
        pg, metrics = ppo_policy_loss(
            logp.float(),
            exp.old_logprobs,
            exp.advantages,
            mask,
            clip_low=ppo.clip_low,
            clip_high=ppo.clip_high,
            dual_clip=ppo.dual_clip,
            ref_logp=exp.ref_logprobs if in_loss else None,
            kl_coef=float(self.kl.value) if in_loss else 0.0,
            kl_kind=ppo.kl_kind,
            entropy=entropy.float(),
            entropy_coef=ppo.entropy_coef,
            agg=ppo.agg,
            cu_seqlens=exp.cu_resp,
            **backend,
        )
        metrics = {
            k if k in ("approx_kl", "entropy") else f"policy/{k}": v for k, v in metrics.items()
        }
        vl = torch.zeros((), device=self.device)
        if self.critic is not None:
            vl, vm = value_loss(
                self._values(exp),
                exp.values,
                exp.returns,
                mask,
                clip=ppo.value_clip,
                agg=ppo.agg,
                cu_seqlens=exp.cu_resp,
                **backend,
            )
            metrics.update({f"value/{k}": v for k, v in vm.items()})
            metrics["value_loss"] = vl.detach()
        metrics["policy_loss"] = pg.detach()
        return pg, vl, metrics

    @property
    def _budget(self) -> int:
        return self.cfg.train.micro_batch_tokens

    def _units(self, exp: Experience, seqs: list[int]) -> int:
        if self.ppo.agg == "token-mean":
            return int(exp.cu_resp_cpu.diff()[seqs].sum())
        return len(seqs)

    def update(self, exp: Experience, step: int) -> dict[str, torch.Tensor]:
        """ppo_epochs x num_mini_batches optimizer steps on ``exp``; averaged metrics.

        Mini-batches are drawn over the step's GLOBAL sequence numbering (rank r holds
        sequences [r * B, (r + 1) * B)), so every rank agrees on them and R processes take
        the optimizer steps one process would. Each rank trains on its own members of a
        mini-batch, weighted by their share of the mini-batch's global loss units; a rank
        with fewer micro-batches runs zero-weight ones so that all take part in as many
        FSDP collectives."""
        ppo, tc, ctx = self.ppo, self.cfg.train, self.ctx
        lengths = exp.seq_lens()
        B = exp.num_seqs
        offset = ctx.rank * B  # global number of this rank's first sequence
        sums: dict[str, torch.Tensor] = {}
        updates = 0
        stopped = False
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        max_norm = self.cfg.optim.max_grad_norm or math.inf
        for _epoch in range(ppo.ppo_epochs):
            order = torch.randperm(B * ctx.world_size, generator=g).tolist()
            for i in range(ppo.num_mini_batches):
                mine = [j - offset for j in order[i :: ppo.num_mini_batches] if 0 <= j - offset < B]
                total = global_token_count(self._units(exp, mine), ctx)
                groups = pack_indices(mine, lengths, tc.micro_batch_tokens)
                padding = global_max(len(groups), ctx) - len(groups)
                mb_sums: dict[str, torch.Tensor] = {}
                for k, group in enumerate(groups + [[0]] * padding):
                    w = self._units(exp, group) / total if k < len(groups) else 0.0
                    with self.forward_context():
                        pg, vl, metrics = self.micro_losses(exp.select(group))
                    (w * (pg + ppo.vf_coef * vl)).backward()
                    for name, v in metrics.items():
                        mb_sums[name] = mb_sums.get(name, 0.0) + w * v.float()
                mb_sums = self._all_ranks(mb_sums)
                mb_sums["grad_norm"] = clip_grad_norm_(
                    [p for p in self.policy.parameters() if p.requires_grad], max_norm
                ).float()
                if self.critic is not None:
                    mb_sums["value/grad_norm"] = clip_grad_norm_(
                        self.critic.parameters(), max_norm
                    ).float()
                # nothing non-finite reaches the weights, the optimizer states or a
                # checkpoint; the early-stop check needs the approximate KL on the host
                host = self.guard.check(mb_sums, step, need_host=ppo.target_kl > 0)
                self.memory.prepare_optimizer_step()
                for opt in self.optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                updates += 1
                for name, v in mb_sums.items():
                    sums[name] = sums.get(name, 0.0) + v.to(self.device)
                # the KL is global, so every rank stops at the same mini-batch
                if ppo.target_kl > 0 and host["approx_kl"] > ppo.target_kl:
                    stopped = True
                    break
            if stopped:
                break
        out = {k: v / updates for k, v in sums.items()}
        out["updates"] = torch.tensor(float(updates), device=self.device)
        out["early_stop"] = torch.tensor(float(stopped), device=self.device)
        return out

    def _all_ranks(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-rank metric sums -> their totals over the ranks (one all-reduce)."""
        if not self.ctx.distributed or not sums:
            return sums
        names = list(sums)
        local = torch.stack([torch.as_tensor(sums[k], device=self.device).float() for k in names])
        return dict(zip(names, all_reduce_sum(local, self.ctx).unbind()))
