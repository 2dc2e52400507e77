"""PPO with a critic, and the critic-free GRPO / Dr. GRPO / RLOO / REINFORCE++, as ``kind=``
values of one RL stage.

One iteration (``PPOTrainer.iteration``), with the generate -> score -> train phases of
``fastrlhf.rollout.HybridMemoryManager``:

1. generate: P = ``rollout_batch_size`` prompts (a seeded permutation per epoch of the
   prompt set, a pure function of the iteration), each sampled ``n_samples`` times with
   the policy's own weights and a reusable KV cache: B = P * n_samples sequences.
2. score (no grad), on the R response tokens only (the "response layout": per sequence,
   its response tokens in order, ``cu_resp`` [B + 1]):
   old log-probs (policy), reference log-probs (the LoRA policy with its adapter off, or
   a frozen copy of the initial policy), critic values (PPO), and one score per sequence:
   a reward model's last-token value normalised with its stored statistics, or a
   ``module:function`` reward (``fastrlhf.trainers.rewards``).
   The KL penalty goes into the reward (``kl_placement="reward"``: -beta * (old - ref) on
   every response token, beta fixed or adaptive) or into the loss (``"loss"``: beta * k3
   through ``ppo_policy_loss``), or nowhere.
3. advantages: PPO: the per-token rewards (score on each sequence's last token) through
   GAE (``ops.packed_gae``, the C++/CUDA extension, on the response layout: prompt tokens
   are not there at all, which is the same as masking them), then ``ops.masked_whiten``.
   GRPO / Dr. GRPO / RLOO: ``ops.group_advantages`` over the n samples of each prompt,
   broadcast to their tokens; REINFORCE++: discounted per-token returns, globally
   whitened (``group_advantages(kind="reinforce++")``).
4. train: ``ppo_epochs`` x ``num_mini_batches`` optimizer steps; a mini-batch is packed
   into micro-batches of <= ``train.micro_batch_tokens`` tokens whose losses are
   weighted by their share of the mini-batch's loss units (tokens for token-mean,
   sequences otherwise), so packing does not change the result. Log-probs and entropy
   come from ``ops.linear_token_logprobs`` on the policy's hidden states at response
   positions (the [N, V] logits never exist); the loss is ``ops.ppo_policy_loss``
   (decoupled clip_low / clip_high, optional dual clip, entropy bonus, token- or
   sequence-level aggregation) plus ``vf_coef`` * ``ops.value_loss`` (clipped) for the
   critic. With ``target_kl > 0`` the update stops early once a mini-batch's approximate
   KL(old || new) exceeds it (one host sync per mini-batch, only then).

``fused_ops=False`` runs the same loop on the PyTorch references (materialised logits +
log_softmax, the padded reverse GAE loop, the unfused losses); ``memory_reuse=False``
allocates a fresh KV cache for every rollout. Both exist for the benchmark comparison.

Metrics (per iteration, averaged over ``logging.log_every``): reward mean / std, KL to
the reference (nats per sequence) and beta, clip fraction, approximate KL, entropy,
policy and value losses, explained variance of the critic, response length, tokens/s of
each phase and, on CUDA, each phase's peak memory. They stay device tensors until a
logging step, which fetches them in one host sync (that is also where a non-finite loss
stops the run). The generation itself syncs (EOS checks), as does selecting response
tokens after it; an adaptive KL controller with the KL in the loss needs beta on the
host each iteration. The LR schedule advances once per iteration (``train.max_steps``
iterations), whatever the number of optimizer steps inside it.

Checkpoints (``checkpoint.*``, the shared ``fastrlhf.checkpoint`` format) hold the policy,
the critic (under ``critic/``), both optimizers and schedules, the RNG state and the KL
controller: a resumed run continues bit-identically. The final directory is the policy in
HF format, loadable by the next stage. Entry points: ``run_ppo(cfg, ppo)``, and ``run(cfg)``
for ``fastrlhf.trainers.run_stage`` (what ``fastrlhf ppo|grpo --config FILE`` calls).

Legend: P = prompts, B = sequences, N = packed tokens (prompts + responses), R = response
tokens (labels), H = hidden size, V = vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrlhf.checkpoint import atomic_write_dir_all_ranks, save_checkpoint
from fastrlhf.config import PPOConfig, RunConfig
from fastrlhf.distributed import (
    DistContext,
    all_gather_varlen,
    all_reduce_sum,
    clip_grad_norm_,
    gathered_params,
    global_max,
    global_token_count,
    shard_model,
)
from fastrlhf.metrics import plot_metrics
from fastrlhf.trainers.common import (
    data_settings,
    embedded_task,
    frozen,
    load_policy_for,
    model_path,
    stage_records,
    weights_dtype,
)
from fastrlhf.trainers.loop import (
    TrainResult,
    _fmt,
    build_optimizer,
    build_scheduler,
    exporter,
    open_logger,
    pack_indices,
    peak_memory_gb,
    prepare_run_dir,
    restore_or_reset,
    stage_context,
    step_indices,
)
from fastrlhf.trainers.rewards import (
    Experience,
    RewardFn,
    call_reward_function,
    consecutive_chunks,
    critic_free_advantages,
    gae_advantages,
    kl_controller,
    load_reward_function,
    reward_model_scores,
    sequence_ids,
)


class _Trained(torch.nn.Module):
    """The modules a checkpoint holds: the policy, and the critic for PPO."""

    def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module | None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic


# ---------------------------------------------------------------------------------------
# the pieces of a step that do not need the trainer (tests call them directly)


def response_logprobs(
    policy, exp: Experience, temperature: float, *, fused: bool = True, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs [R], entropies [R] or None) of the response tokens of ``exp``.

    fused: ``ops.linear_token_logprobs`` (no [R, V] logits); else the reference, which
    materialises the logits and a log_softmax of them.
    """
    hidden = policy(exp.input_ids, exp.position_ids, exp.cu_seqlens, exp.max_seqlen)
    h = hidden.index_select(0, exp.positions)  # [R, H]
    weight, bias = policy.lm_head_weight, policy.lm_head_bias
    if weight.dtype != h.dtype:  # bf16 hidden states from autocast, fp32 master weights
        weight = weight.to(h.dtype)
        bias = bias.to(h.dtype) if bias is not None else None
    kwargs = dict(return_entropy=entropy, vocab_size=policy.vocab_size)
    if fused:
        from fastrlhf.ops.linear_logprobs import linear_token_logprobs

        out = linear_token_logprobs(
            h, weight, exp.labels, bias, temperature, validate=False, **kwargs
        )
    else:
        from fastrlhf.ops.reference.linear_logprobs import linear_token_logprobs_reference

        out = linear_token_logprobs_reference(h, weight, exp.labels, bias, temperature, **kwargs)
    return out if entropy else (out, None)


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    return x.mean(), (x.std() if x.numel() > 1 else torch.zeros((), device=x.device))


# ---------------------------------------------------------------------------------------
# the trainer


@dataclass
class RLModels:
    """The models of an RL run. ``reference`` None: no KL term, or a LoRA policy whose
    adapter-off self is the reference; exactly one of ``reward_model`` / ``reward_fn``;
    ``critic`` only for kind="ppo"."""

    policy: torch.nn.Module  # fastrlhf.models.PolicyModel
    reference: torch.nn.Module | None = None  # frozen PolicyModel
    reward_model: torch.nn.Module | None = None  # frozen ValueModel
    reward_fn: RewardFn | None = None
    critic: torch.nn.Module | None = None  # trainable ValueModel


def load_models(cfg: RunConfig, ppo: PPOConfig, device: torch.device) -> RLModels:
    """Load the policy (``model.name_or_path``), reference, reward and critic of a run."""
    from fastrlhf.models import load_value_model

    if (ppo.reward_model is None) == (ppo.reward_fn is None):
        raise ValueError(
            "set exactly one of ppo.reward_model (a reward model directory) and ppo.reward_fn "
            f"('package.module:function'); got {ppo.reward_model!r} and {ppo.reward_fn!r}"
        )
    path = model_path(cfg.model, cfg.run_dir)
    policy = load_policy_for(cfg, path, device, trainable=True)
    models = RLModels(policy)
    if ppo.uses_reference and not (policy.has_lora and ppo.ref_model is None):
        models.reference = load_policy_for(cfg, ppo.ref_model or path, device, trainable=False)
    m = cfg.model
    value_kwargs = dict(
        dtype=weights_dtype(m),
        device=device,
        trust_remote_code=m.trust_remote_code,
        attn_impl=m.attn_impl,
    )
    if ppo.reward_model is not None:
        models.reward_model = frozen(load_value_model(ppo.reward_model, **value_kwargs))
        _check_same_vocab(policy.tokenizer, models.reward_model.tokenizer, ppo.reward_model)
    else:
        models.reward_fn = load_reward_function(ppo.reward_fn)
    if ppo.kind == "ppo":
        # from the reward model by default: its backbone already reads responses for quality
        critic_src = ppo.critic_model or ppo.reward_model or path
        models.critic = load_value_model(
            critic_src,
            gradient_checkpointing=m.gradient_checkpointing,
            seed=cfg.seed,
            **value_kwargs,
        ).train()
    return models


class PPOTrainer:
    """Models, optimizers and memory phases of one RL run; ``iteration(step)`` does one
    generate -> score -> train step and returns its metrics (device tensors).

    ``models`` and ``prompts`` (PromptItems) default to what ``cfg`` names; passing them
    lets a caller (the GPU benchmark) bring models built in memory.
    """

    def __init__(
        self,
        cfg: RunConfig,
        ppo: PPOConfig,
        *,
        models: RLModels | None = None,
        prompts: list | None = None,
        eval_prompts: list | None = None,
        ctx: DistContext | None = None,
    ) -> None:
        from fastrlhf.data.formats import tokenize_prompts
        from fastrlhf.rollout import GenerationConfig, HybridMemoryManager

        ppo.validate()
        self.cfg, self.ppo = cfg, ppo
        self.name = ppo.kind
        self.ctx = ctx = stage_context(cfg, ctx)
        self.device = ctx.device
        self.autocast = cfg.train.bf16 and self.device.type == "cuda"
        _check_world_size(ppo, ctx)
        models = models or load_models(cfg, ppo, self.device)
        self.policy, self.ref, self.critic = models.policy, models.reference, models.critic
        self.reward_model, self.reward_fn = models.reward_model, models.reward_fn
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError("models: give exactly one of reward_model and reward_fn")
        if (self.critic is None) != (ppo.kind != "ppo"):
            raise ValueError(
                f"ppo.kind={ppo.kind!r} needs {'a' if ppo.kind == 'ppo' else 'no'} critic"
            )
        tok = self.policy.tokenizer
        if prompts is None:
            train_records, eval_records = stage_records(cfg.data, "prompts")
            settings = data_settings(cfg.data)
            prompts = tokenize_prompts(train_records, tok, settings)
            eval_prompts = tokenize_prompts(eval_records, tok, settings)
            if not prompts:
                raise ValueError(f"data.source={cfg.data.source!r} gave no RL prompts")
        self.prompts, self.eval_prompts = prompts, eval_prompts or []
        # FSDP2 for the trained models, before their optimizers exist; the frozen reference
        # and reward model stay whole on every rank (no gradients or optimizer states to
        # shard, and the memory manager can park them on the host)
        shard_model(self.policy, ctx)
        if self.critic is not None:
            shard_model(self.critic, ctx)
        self.module = _Trained(self.policy, self.critic)
        aux = {"reference": self.ref, "reward": self.reward_model}
        aux = {k: v for k, v in aux.items() if v is not None}

        steps = cfg.train.max_steps
        self.optimizer = build_optimizer(self.policy, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, steps)
        self.optimizers = [self.optimizer]
        self.critic_optimizer = self.critic_scheduler = None
        if self.critic is not None:
            critic_optim = dataclasses.replace(cfg.optim, lr=ppo.critic_lr)
            self.critic_optimizer = build_optimizer(self.critic, critic_optim, self.device)
            self.critic_scheduler = build_scheduler(self.critic_optimizer, critic_optim, steps)
            self.optimizers.append(self.critic_optimizer)
        self.memory = HybridMemoryManager(
            self.policy,
            self.optimizers,
            aux,
            offload_optimizer=ppo.offload_optimizer,
            offload_models=list(aux) if ppo.offload_models else (),
        )
        self.kl = kl_controller(
            ppo.kl_coef, adaptive=ppo.adaptive_kl, target=ppo.kl_target, horizon=ppo.kl_horizon
        )
        # no tokenizer (in-memory models): no EOS, every response is max_new_tokens long
        eos = tok.eos_token_id if tok is not None else None
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        self.gen_config = GenerationConfig(
            max_new_tokens=ppo.max_new_tokens,
            temperature=ppo.temperature,
            top_k=ppo.top_k,
            top_p=ppo.top_p,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        self.eval_config = dataclasses.replace(
            self.gen_config, do_sample=False, max_new_tokens=ppo.eval_max_new_tokens
        )

    # ---- contexts -------------------------------------------------------------------

    def forward_context(self):
        import contextlib

        if self.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _reference(self):
        """(context, is_model): the frozen reference model, or the adapter-off policy."""
        if self.ref is not None:
            return self.memory.use("reference"), True
        return self.policy.reference_mode(), False

    # ---- 1. generate ----------------------------------------------------------------

    def _generate(self, items, generation_config, *, keys=None, reuse_cache: bool = True):
        """Rollout of ``items``; ``keys`` [B] make each sequence's samples a function of
        its key alone (``rollout.sequence_keys``), whatever batch or rank it is in."""
        from fastrlhf.rollout import ReusableKVCache, generate, pack_prompts

        ids, cu = pack_prompts([torch.tensor(it.input_ids) for it in items], self.device)
        # memory_reuse: the manager's cache, reset (not reallocated) every rollout and
        # released before training; otherwise a fresh allocation per rollout
        reuse = reuse_cache and self.ppo.memory_reuse
        kv = self.memory.kv_cache if reuse else ReusableKVCache()
        # a sharded policy is gathered once per rollout, not once per layer per token
        with gathered_params(self.policy), self.forward_context():
            return generate(self.policy, ids, cu, generation_config, kv_cache=kv, sample_keys=keys)

    # ---- 2. score -------------------------------------------------------------------

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
                [response_logprobs(model, c, T, fused=fused, entropy=False)[0] for c in chunks]
            )

        with self.forward_context():
            if ppo.recompute_old_logprobs:
                exp.old_logprobs = logprobs(self.policy)
            if ppo.uses_reference:
                ctx, is_model = self._reference()
                with ctx as ref:
                    exp.ref_logprobs = logprobs(ref if is_model else self.policy)
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

    # ---- 3. train -------------------------------------------------------------------

    def micro_losses(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(policy loss, value loss, metrics) of a micro-batch, autograd-connected."""
        ppo, fused = self.ppo, self.ppo.fused_ops
        from fastrlhf.ops.losses import ppo_policy_loss, value_loss

        # cu_resp is built here, so its layout needs no check (that would be a host sync)
        backend = dict(impl="auto" if fused else "reference", validate=False)
        logp, entropy = response_logprobs(
            self.policy, exp, self.gen_config.logprob_temperature, fused=fused
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
                self.memory.prepare_optimizer_step()
                for opt in self.optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                updates += 1
                for name, v in mb_sums.items():
                    sums[name] = sums.get(name, 0.0) + v.to(self.device)
                # the KL is global, so every rank stops at the same mini-batch
                if ppo.target_kl > 0 and float(mb_sums["approx_kl"]) > ppo.target_kl:
                    stopped = True  # the host sync of the check, only when it is enabled
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

    # ---- one iteration --------------------------------------------------------------

    def rank_prompts(self, step: int) -> tuple[list[int], int]:
        """(this rank's prompt indices of iteration ``step``, the step-wide number of its
        first prompt). The step's prompts are split into equal contiguous blocks, one per
        rank, so the samples of a prompt (a GRPO group) never straddle two ranks."""
        ppo, ctx = self.ppo, self.ctx
        idx = step_indices(step - 1, ppo.rollout_batch_size, len(self.prompts), self.cfg.seed)
        per_rank = len(idx) // ctx.world_size
        first = ctx.rank * per_rank
        return idx[first : first + per_rank], first

    def iteration(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """generate -> score -> train for iteration ``step`` (1-based).

        Returns (metrics as device tensors, host-side timings / memory per phase)."""
        from fastrlhf.rollout.sampling import sequence_keys

        ppo = self.ppo
        idx, first = self.rank_prompts(step)
        items = [self.prompts[i] for i in idx for _ in range(ppo.n_samples)]
        group_ids = torch.arange(len(idx)).repeat_interleave(ppo.n_samples)  # [B]
        # sequence j of the step's whole rollout samples with the key (seed, step, j): the
        # same tokens whichever rank, and whichever batch, generates it
        global_ids = first * ppo.n_samples + torch.arange(len(items))
        keys = sequence_keys(self.cfg.seed, step, global_ids).to(self.device)  # [B]
        host: dict[str, float] = {}
        t0 = time.perf_counter()
        self.memory.generate()
        rollout = self._generate(items, self.gen_config, keys=keys)
        t1 = time.perf_counter()
        self._phase_memory(host, "generate")
        self.memory.score()
        exp, metrics = self.score(rollout, items, group_ids)
        t2 = time.perf_counter()
        self._phase_memory(host, "score")
        self.memory.train()
        metrics.update(self.update(exp, step))
        self.scheduler.step()
        if self.critic_scheduler is not None:
            self.critic_scheduler.step()
        t3 = time.perf_counter()
        self._phase_memory(host, "train")
        n_tokens = exp.input_ids.numel()
        host["tokens_per_s/generate"] = int(exp.cu_resp_cpu[-1]) / max(t1 - t0, 1e-9)
        host["tokens_per_s/score"] = n_tokens / max(t2 - t1, 1e-9)
        host["tokens_per_s/train"] = n_tokens * ppo.ppo_epochs / max(t3 - t2, 1e-9)
        host["time/step_s"] = t3 - t0
        host["lr"] = self.scheduler.get_last_lr()[0]
        return metrics, host

    def _phase_memory(self, host: dict[str, float], phase: str) -> None:
        # the manager resets the CUDA peak on phase entry: this is the phase's own peak
        if self.device.type == "cuda":
            host[f"memory/{phase}_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30

    # ---- evaluation -----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward of greedy answers to the held-out prompts, and on the embedded task
        their gold accuracy (the checker the policy never sees)."""
        if not self.eval_prompts:
            return {}
        was_training = self.policy.training
        self.policy.eval()
        try:
            # a throwaway cache: the training phase must not find the manager's alive
            rollout = self._generate(self.eval_prompts, self.eval_config, reuse_cache=False)
            exp = Experience.from_rollout(rollout)
            chunks = [exp.select(c) for c in consecutive_chunks(exp.seq_lens(), self._budget)]
            out = {"reward": float(self._scores(chunks, rollout, self.eval_prompts).mean())}
            if self.cfg.data.source == "embedded":
                task = embedded_task(self.cfg.data)
                texts = self.policy.tokenizer.batch_decode(
                    rollout.responses(), skip_special_tokens=True
                )
                gold = [task.gold_score(it.text, t) for it, t in zip(self.eval_prompts, texts)]
                out["gold_accuracy"] = sum(gold) / len(gold)
        finally:
            self.policy.train(was_training)
        return out

    # ---- checkpoints ----------------------------------------------------------------

    def save_model(self, path: Path) -> None:
        """The policy in HF format at ``path`` (the next stage loads it), the critic under
        ``path/critic``. One process; ``export`` covers sharded models too."""
        self.policy.save_pretrained(path)
        if self.critic is not None:
            self.critic.save_pretrained(Path(path) / "critic")

    @property
    def export(self):
        """``export(dir)``: ``save_model``, or with several processes the consolidated
        policy (and critic) written by rank 0; every rank calls it."""
        models = {"": self.policy}
        if self.critic is not None:
            models["critic"] = self.critic
        return exporter(models, self.save_model, self.ctx)

    def trainer_state(self, step: int) -> dict:
        state = {
            "step": step,
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl.state_dict(),
            "data_position": {"prompts_seen": step * self.ppo.rollout_batch_size},
            "stage": self.name,
        }
        if self.critic_scheduler is not None:
            state["critic_scheduler"] = self.critic_scheduler.state_dict()
        return state

    def load_trainer_state(self, state: dict) -> int:
        """Restore what ``trainer_state`` saved (the weights, optimizer and RNG states come
        back through ``fastrlhf.checkpoint.load_checkpoint``); returns the step."""
        self.scheduler.load_state_dict(state["scheduler"])
        if self.critic_scheduler is not None:
            self.critic_scheduler.load_state_dict(state["critic_scheduler"])
        self.kl.load_state_dict(state["kl_controller"])
        return int(state["step"])


def _check_world_size(ppo: PPOConfig, ctx: DistContext) -> None:
    """Data parallelism splits a step's prompts evenly over the ranks, and FSDP shards the
    optimizer states (DTensors) that the memory manager does not move to the host."""
    if not ctx.distributed:
        return
    if ppo.rollout_batch_size % ctx.world_size:
        raise ValueError(
            f"ppo.rollout_batch_size={ppo.rollout_batch_size} must be a multiple of the "
            f"{ctx.world_size} processes (each rank generates an equal share of the prompts)"
        )
    if ppo.offload_optimizer:
        raise ValueError(
            "ppo.offload_optimizer is not supported with several processes: FSDP already "
            "shards the optimizer states over the ranks; set it to false"
        )


def _check_same_vocab(policy_tok, reward_tok, where: str) -> None:
    """The reward model scores the policy's token ids as they are: same vocabulary needed."""
    if reward_tok is None:
        return
    if policy_tok.get_vocab() != reward_tok.get_vocab():
        raise ValueError(
            f"ppo.reward_model={where!r} uses a different tokenizer vocabulary than the policy "
            f"({len(reward_tok)} vs {len(policy_tok)} tokens); re-tokenisation is not supported"
        )


# ---------------------------------------------------------------------------------------
# the stage loop


def run_ppo(
    cfg: RunConfig, ppo: PPOConfig, *, resume: bool = False, ctx: DistContext | None = None
) -> TrainResult:
    """Train for ``cfg.train.max_steps`` RL iterations in ``cfg.run_dir``.

    Checkpoints (``checkpoint.save_every`` iterations, and the last) hold the policy, the
    critic, both optimizers and schedulers, the RNG states and the KL controller, so
    ``resume=True`` continues from the latest one exactly (with any number of processes).
    """
    ctx = stage_context(cfg, ctx)
    run_dir = prepare_run_dir(cfg, ctx)
    trainer = PPOTrainer(cfg, ppo, ctx=ctx)
    start, state = restore_or_reset(
        trainer.name, trainer.module, trainer.optimizers, run_dir, resume, cfg.seed, ctx
    )
    if start:
        trainer.load_trainer_state(state)
    export = trainer.export
    logger = open_logger(cfg, run_dir, trainer.name, ctx)
    from tqdm.auto import tqdm

    tc = cfg.train
    bar = tqdm(
        total=tc.max_steps,
        initial=start,
        desc=trainer.name,
        disable=not (tc.progress_bar and ctx.is_main),
        dynamic_ncols=True,
    )

    def log_eval(step: int, metrics: dict[str, float]) -> None:
        logger.log(step, "eval", metrics)
        if ctx.is_main:
            bar.write(f"[{trainer.name}] step {step} eval " + _fmt(metrics))

    window: list[tuple[dict[str, torch.Tensor], dict[str, float]]] = []
    eval_metrics: dict[str, float] = {}
    try:
        if start == 0 and tc.eval_every:  # the starting point, to compare every later eval with
            eval_metrics = trainer.evaluate()
            log_eval(0, eval_metrics)
        for step in range(start + 1, tc.max_steps + 1):
            window.append(trainer.iteration(step))
            bar.update(1)
            last = step == tc.max_steps
            if step % cfg.logging.log_every == 0 or last:
                row = _window_row(window, step, trainer.name, trainer.device)
                logger.log(step, "train", row)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}")
                window = []
            if (tc.eval_every and step % tc.eval_every == 0) or last:
                eval_metrics = trainer.evaluate()
                log_eval(step, eval_metrics)
            every = cfg.checkpoint.save_every
            if (every and step % every == 0) or last:
                save_checkpoint(
                    run_dir / "checkpoints",
                    step,
                    trainer.module,
                    trainer.optimizers,
                    trainer.trainer_state(step),
                    export=export,
                    keep_last=cfg.checkpoint.keep_last,
                    ctx=ctx,
                )
        if trainer.memory.phase.value != "idle":
            trainer.memory.finish()
    finally:
        bar.close()
        logger.close()
    if start >= tc.max_steps:  # resumed a finished run: nothing trained, evaluate again
        eval_metrics = trainer.evaluate()
    final_dir = None
    if cfg.checkpoint.save_final:
        final_dir = atomic_write_dir_all_ranks(run_dir / "final", export, ctx)
    if cfg.logging.plots and ctx.is_main:
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "plots", title=trainer.name)
    return TrainResult(steps=tc.max_steps, final_dir=final_dir, eval_metrics=eval_metrics)


def run(cfg: RunConfig, *, resume: bool = False, ctx: DistContext | None = None) -> TrainResult:
    """Entry point of ``fastrlhf.trainers.run_stage``: the ``ppo`` section of ``cfg``
    (defaults when the config has none), with ``kind`` taken from the stage name for
    ``stage: grpo`` unless the section names a critic-free kind itself."""
    return run_ppo(cfg, cfg.ppo, resume=resume, ctx=ctx)


def _window_row(window, step: int, name: str, device: torch.device) -> dict[str, float]:
    """Mean of each metric over the window's iterations: the one host sync per log."""
    keys = sorted({k for metrics, _ in window for k in metrics})
    stacked = torch.stack(
        [torch.stack([m[k].float() for m, _ in window if k in m]).mean() for k in keys]
    ).tolist()
    row = dict(zip(keys, stacked))
    for k in ("policy_loss", "value_loss", "reward_mean"):
        if k in row and not math.isfinite(row[k]):
            raise FloatingPointError(
                f"[{name}] non-finite {k} ({row[k]}) in the iterations up to step {step}"
            )
    for k in {k for _, h in window for k in h}:
        vals = [h[k] for _, h in window if k in h]
        row[k] = max(vals) if k.startswith("memory/") else sum(vals) / len(vals)
    row["peak_mem_gb"] = peak_memory_gb(device)
    return row
