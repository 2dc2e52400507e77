"""PPO with a critic, and the critic-free GRPO / Dr. GRPO / RLOO / REINFORCE++, as ``kind=``
values of one RL stage: ``PPOStage``, trained by the shared loop (``loop.train``), whose
``train_step`` is one iteration (``iteration``), with the generate -> score -> train
phases of ``fastrlhf.rollout.HybridMemoryManager``:

1. generate (here): P = ``rollout_batch_size`` prompts (a seeded permutation per epoch of
   the prompt set, a pure function of the iteration), each sampled ``n_samples`` times
   with the policy's own weights and a reusable KV cache: B = P * n_samples sequences.
2. score (``rl_score``), on the R response tokens only: old and reference log-probs,
   critic values (PPO), one score per sequence (reward model or ``module:function``
   reward, ``rewards``), the KL penalty, and the advantages (``experience``).
3. train (``rl_update``): ``ppo_epochs`` x ``num_mini_batches`` optimizer steps, each
   after its losses, gradient norms and metrics are checked for non-finite values
   (``numerics.StepGuard``: on the device with fused AdamW, else on the host).

``fused_ops=False`` runs the same iteration on the PyTorch references (materialised
logits + log_softmax, the padded reverse GAE loop, the unfused losses);
``memory_reuse=False`` allocates a fresh KV cache for every rollout. Both exist for the
benchmark comparison.

Metrics (per iteration, averaged over ``logging.log_every`` by the loop): reward mean /
std, KL to the reference (nats per sequence) and beta, clip fraction, approximate KL,
entropy, policy and value losses, explained variance of the critic, response length,
tokens/s of each phase and, on CUDA, each phase's peak memory. They stay device tensors
until the loop's logging step or checkpoint. The generation itself syncs (EOS checks),
as does selecting response tokens after it; an adaptive KL controller with the KL in the
loss needs beta on the host each iteration. The loop steps the LR schedules once per
iteration (``train.max_steps`` iterations), whatever the number of optimizer steps in it.

Checkpoints (the shared ``fastrlhf.checkpoint`` format) hold the policy, the critic
(under ``critic/``), both optimizers and schedules, the RNG state and the KL controller:
a resumed run continues bit-identically. The final directory is the policy in HF format,
loadable by the next stage. ``run(cfg)`` is the entry point of
``fastrlhf.trainers.run_stage`` (what ``fastrlhf ppo|grpo --config FILE`` calls).

Legend: P = prompts, B = sequences, N = packed tokens (prompts + responses), R = response
tokens (labels), H = hidden size, V = vocabulary.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from fastrlhf.config import RL_STAGES, PPOConfig, RunConfig, check_section
from fastrlhf.distributed import DistContext, gathered_params, shard_model
from fastrlhf.trainers.data_order import step_indices
from fastrlhf.trainers.experience import Experience, consecutive_chunks
from fastrlhf.trainers.kl import kl_controller
from fastrlhf.trainers.loop import Stage, TrainResult, train
from fastrlhf.trainers.numerics import StepGuard
from fastrlhf.trainers.optim import build_optimizer, build_scheduler
from fastrlhf.trainers.records import data_settings, embedded_task, stage_records
from fastrlhf.trainers.rl_models import RLModels, TrainedModules, load_models
from fastrlhf.trainers.rl_score import RolloutScoring
from fastrlhf.trainers.rl_update import PolicyUpdate
from fastrlhf.trainers.runtime import stage_context


class PPOStage(RolloutScoring, PolicyUpdate, Stage):
    """Models, optimizers and memory phases of one RL run; ``train_step(step)`` is one
    generate -> score -> train iteration (``iteration``, which also returns its metrics
    split into device tensors and host numbers).

    ``models`` and ``prompts`` (PromptItems) default to what ``cfg`` names; passing them
    lets a caller (the GPU benchmark) bring models built in memory.
    """

    eval_at_start = True  # the initial policy's reward: what RL must improve on
    progress_metric = "reward_mean"

    def __init__(
        self,
        cfg: RunConfig,
        ppo: PPOConfig | None = None,
        *,
        models: RLModels | None = None,
        prompts: list | None = None,
        eval_prompts: list | None = None,
        ctx: DistContext | None = None,
    ) -> None:
        from fastrlhf.data.formats import tokenize_prompts
        from fastrlhf.rollout import GenerationConfig, HybridMemoryManager

        # a section built in code gets its nulls resolved and the rules a loaded one got
        ppo = (cfg.ppo if ppo is None else ppo).for_stage(
            cfg.stage if cfg.stage in RL_STAGES else "ppo"
        )
        check_section(ppo, "ppo")
        self.cfg, self.ppo = cfg, ppo
        self.name = ppo.kind
        self.ctx = ctx = stage_context(cfg, ctx)
        self.device = ctx.device
        self.bf16 = cfg.train.bf16
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
            settings = data_settings(cfg.data, cfg.run_dir)
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
        self.module = TrainedModules(self.policy, self.critic)
        self.models = {"": self.policy}
        if self.critic is not None:
            self.models["critic"] = self.critic
        aux = {"reference": self.ref, "reward": self.reward_model}
        aux = {k: v for k, v in aux.items() if v is not None}

        steps = cfg.train.max_steps
        self.optimizer = build_optimizer(self.policy, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, steps)
        self.optimizers, self.schedulers = [self.optimizer], [self.scheduler]
        self.critic_optimizer = self.critic_scheduler = None
        if self.critic is not None:
            critic_optim = dataclasses.replace(cfg.optim, lr=ppo.critic_lr)
            self.critic_optimizer = build_optimizer(self.critic, critic_optim, self.device)
            self.critic_scheduler = build_scheduler(self.critic_optimizer, critic_optim, steps)
            self.optimizers.append(self.critic_optimizer)
            self.schedulers.append(self.critic_scheduler)
        self.guard = StepGuard(self.optimizers, distributed=ctx.distributed, stage=self.name)
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
            compile=cfg.rollout.compile,
        )
        self.eval_config = dataclasses.replace(
            self.gen_config, do_sample=False, max_new_tokens=ppo.eval_max_new_tokens
        )

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
        host: dict[str, float] = {"lr": self.optimizer.param_groups[0]["lr"]}
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
        t3 = time.perf_counter()
        self._phase_memory(host, "train")
        n_tokens = exp.input_ids.numel()
        host["tokens_per_s/generate"] = int(exp.cu_resp_cpu[-1]) / max(t1 - t0, 1e-9)
        host["tokens_per_s/score"] = n_tokens / max(t2 - t1, 1e-9)
        host["tokens_per_s/train"] = n_tokens * ppo.ppo_epochs / max(t3 - t2, 1e-9)
        host["time/step_s"] = t3 - t0
        return metrics, host

    def train_step(self, step: int) -> tuple[dict[str, torch.Tensor | float], int]:
        """One iteration; its metrics stay device tensors until the loop's log sync (the
        losses and gradient norms were checked on the host before each optimizer step)."""
        metrics, host = self.iteration(step)
        return {**metrics, **host}, 0

    def finalize(self) -> None:
        if self.memory.phase.value != "idle":
            self.memory.finish()

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
        ``path/critic``. One process (``models`` tells the loop what to consolidate
        from several)."""
        self.policy.save_pretrained(path)
        if self.critic is not None:
            self.critic.save_pretrained(Path(path) / "critic")

    def state_dict(self, step: int) -> dict:
        state = {
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl.state_dict(),
            "data_position": {"prompts_seen": step * self.ppo.rollout_batch_size},
            "stage": self.name,
        }
        if self.critic_scheduler is not None:
            state["critic_scheduler"] = self.critic_scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved (the weights, optimizer and RNG states come
        back through ``fastrlhf.checkpoint.load_checkpoint``)."""
        self.scheduler.load_state_dict(state["scheduler"])
        if self.critic_scheduler is not None:
            self.critic_scheduler.load_state_dict(state["critic_scheduler"])
        self.kl.load_state_dict(state["kl_controller"])


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


def run(cfg: RunConfig, *, resume: bool = False, ctx: DistContext | None = None) -> TrainResult:
    """Entry point of ``fastrlhf.trainers.run_stage``: the stage built from ``cfg`` (its
    ``ppo`` section) trained by the shared loop."""
    return train(PPOStage(cfg, ctx=ctx), cfg, resume=resume)
