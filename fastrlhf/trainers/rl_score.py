"""Phase 2 of an RL iteration, scoring a rollout: old and reference log-probs, critic
values and sequence scores on the response tokens, then the advantages and the rollout's
metrics (``RolloutScoring``, a part of ``fastrlhf.trainers.ppo.PPOStage``).

The KL penalty goes into the reward (``kl_placement="reward"``: -beta * (old - ref) on
every response token, beta fixed or adaptive) or into the loss (``"loss"``: beta * k3
through ``ppo_policy_loss``, see ``rl_update``), or nowhere. Advantages: PPO: per-token
rewards (the score on each sequence's last token) through GAE; GRPO / Dr. GRPO / RLOO:
group baselines over the n samples of each prompt; REINFORCE++: whitened discounted
returns (``fastrlhf.trainers.experience``).

Legend: B = sequences, N = packed tokens, R = response tokens.
"""

from __future__ import annotations

import functools

import torch

from fastrlhf.distributed import all_gather_varlen, all_reduce_sum
from fastrlhf.trainers.experience import (
    Experience,
    consecutive_chunks,
    critic_free_advantages,
    gae_advantages,
    sequence_ids,
)
from fastrlhf.trainers.loading import reference_model
from fastrlhf.trainers.logprobs import response_logprobs
from fastrlhf.trainers.rewards import call_reward_function, reward_model_scores


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    return x.mean(), (x.std() if x.numel() > 1 else torch.zeros((), device=x.device))


class RolloutScoring:
    """Scoring methods of ``PPOStage`` (which holds the models, configs and memory)."""

    @torch.no_grad()
    def _scores(self, chunks: list[Experience], rollout, items) -> torch.Tensor:
        """[B] float32 sequence scores (reward model or reward function)."""
        if self.reward_model is not None:
            norm = self.ppo.normalize_reward
            with self.memory.use("reward") as rm, self.forward_context():
                scores = torch.cat(
                    [
                        reward_model_scores(
                            rm,
                            c.input_ids,
                            c.position_ids,
                            c.cu_seqlens,
                            c.max_seqlen,
                            normalize=norm,
                        )
                        for c in chunks
                    ]
                )
        else:
            tok = self.policy.tokenizer
            responses = tok.batch_decode(rollout.responses(), skip_special_tokens=True)
            meta = [{**(it.meta or {}), "answer": it.answer} for it in items]
            scores = call_reward_function(
                self.reward_fn,
                [it.text for it in items],
                responses,
                meta,
                name=f"reward function {self.ppo.reward_fn!r}",
            ).to(self.device)
        if self.ppo.reward_clip > 0:
            scores = scores.clamp(-self.ppo.reward_clip, self.ppo.reward_clip)
        return scores.float()

    @torch.no_grad()
    def score(self, rollout, items, group_ids: torch.Tensor) -> tuple[Experience, dict]:
        """Log-probs, values, rewards and advantages of a rollout -> (Experience, metrics)."""
        ppo, fused = self.ppo, self.ppo.fused_ops
        exp = Experience.from_rollout(rollout)
        cu_resp, resp_lens = exp.cu_resp, rollout.response_lens.long()
        # forwards over consecutive chunks of <= train.micro_batch_tokens tokens: the
        # results concatenate in sequence order, and no pass sees the whole rollout at once
        chunks = [exp.select(c) for c in consecutive_chunks(exp.seq_lens(), self._budget)]

        def logprobs(model) -> torch.Tensor:  # [R]
            T = rollout.temperature
            return torch.cat(
                [response_logprobs(model, c, c, temperature=T, fused=fused) for c in chunks]
            )

        with self.forward_context():
            if ppo.recompute_old_logprobs:
                exp.old_logprobs = logprobs(self.policy)
            if ppo.uses_reference:
                use = functools.partial(self.memory.use, "reference")
                with reference_model(self.policy, self.ref, use) as ref:
                    exp.ref_logprobs = logprobs(ref)
            if self.critic is not None:
                exp.values = torch.cat([self._values(c) for c in chunks])
            scores = self._scores(chunks, rollout, items)  # [B]
        exp.old_logprobs = exp.old_logprobs.float()

        beta = self.kl.value
        k1 = None
        token_rewards = None
        if exp.ref_logprobs is not None:
            exp.ref_logprobs = exp.ref_logprobs.float()
            k1 = exp.old_logprobs - exp.ref_logprobs  # [R]
            if ppo.kl_placement == "reward":
                token_rewards = -beta * k1
        if ppo.kind == "ppo":
            rewards = torch.zeros_like(exp.old_logprobs) if token_rewards is None else token_rewards
            rewards = rewards.index_add(0, cu_resp[1:].long() - 1, scores)  # score at the end
            exp.advantages, exp.returns = gae_advantages(
                rewards,
                exp.values,
                cu_resp,
                ppo.gamma,
                ppo.lam,
                whiten=ppo.whiten_advantages,
                fused=fused,
                ctx=self.ctx,
            )
        else:
            exp.advantages = critic_free_advantages(
                ppo.kind,
                scores,
                group_ids.to(self.device),
                cu_resp,
                token_rewards=token_rewards,
                gamma=ppo.gamma,
                ctx=self.ctx,
            )

        seq_kl = None
        if k1 is not None:
            seq_kl = torch.zeros_like(scores).index_add_(0, sequence_ids(cu_resp, k1.numel()), k1)
        metrics = self._rollout_metrics(scores, resp_lens, rollout.finished, exp, seq_kl)
        if k1 is not None:
            metrics["kl_coef"] = torch.as_tensor(beta, dtype=torch.float32, device=self.device)
            if ppo.adaptive_kl:  # beta must be a float for the loss: a host sync there
                kl = metrics["kl"] if ppo.kl_placement == "reward" else float(metrics["kl"])
                self.kl.update(kl, n_steps=int(scores.numel() * self.ctx.world_size))
        return exp, metrics

    def _rollout_metrics(self, scores, resp_lens, finished, exp: Experience, seq_kl) -> dict:
        """Rollout statistics of the WHOLE step (every rank's sequences, gathered), so they
        and the adaptive KL coefficient are the same whatever the number of processes."""
        ctx = self.ctx

        def every(t: torch.Tensor) -> torch.Tensor:
            return all_gather_varlen(t.float(), ctx)[0]

        all_scores = every(scores)  # [B_all]
        reward_mean, reward_std = _mean_std(all_scores)
        adv_count = torch.tensor(float(exp.advantages.numel()), device=self.device)
        adv = all_reduce_sum(
            torch.stack([exp.advantages.float().sum(), adv_count]),
            ctx,
        )
        metrics = {
            "reward_mean": reward_mean,
            "reward_std": reward_std,
            "response_length": every(resp_lens).mean(),
            "finished_frac": every(finished).mean(),
            "advantage_mean": adv[0] / adv[1].clamp(min=1),
        }
        if seq_kl is not None:
            metrics["kl"] = every(seq_kl).mean()  # nats per sequence
        if exp.returns is not None:
            returns, values = every(exp.returns), every(exp.values)  # [R_all]
            resid = returns - values
            var_ret = returns.var() if returns.numel() > 1 else returns.new_ones(())
            metrics["explained_variance"] = 1.0 - resid.var() / var_ret.clamp(min=1e-8)
            metrics["returns_mean"] = returns.mean()
        return metrics

    def _values(self, exp: Experience) -> torch.Tensor:
        """Critic values at the response positions [R], float32."""
        values = self.critic(exp.input_ids, exp.position_ids, exp.cu_seqlens, exp.max_seqlen)
        return values.float()[exp.positions]
