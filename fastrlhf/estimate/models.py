"""The shapes of a run (from its RunConfig) and its models, built with no memory.

``Workload`` turns the config into the batch shapes each phase sees, worst case: every
prompt ``data.max_prompt_length`` tokens, every response ``ppo.max_new_tokens`` long (RL),
SFT/DPO/RM sequences ``data.max_length`` tokens of which ``max_prompt_length`` are prompt.
``build_models`` makes the trainer's modules (``PolicyModel`` / ``ValueModel`` around the
transformers classes) on the meta device and materialises them as fake or real CPU
tensors (see ``fastrlhf.estimate.measure``), with AdamW states already created, as they
are in every iteration after the first.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from fastrlhf.config import RunConfig

RL_STAGES = ("ppo", "grpo")


@dataclass(frozen=True)
class Workload:
    stage: str
    seq_len: int  # L: tokens of one sequence
    loss_len: int  # tokens of one sequence that reach the lm_head (responses)
    prompt_len: int  # P
    rollout_seqs: int  # B: sequences generated per iteration (RL), else 0
    score_seqs: int  # sequences per scoring forward (RL)
    micro_seqs: int  # sequences (pairs for rm/dpo) per training micro-batch
    micro_batches: int  # micro-batches per optimizer step
    optimizer_steps: int  # optimizer steps per iteration (RL) or per step (1)

    @property
    def micro_tokens(self) -> int:
        per = 2 if self.stage in ("rm", "dpo") else 1
        return self.micro_seqs * self.seq_len * per


def workload(cfg: RunConfig) -> Workload:
    d, budget = cfg.data, cfg.train.micro_batch_tokens
    if cfg.stage in RL_STAGES:
        ppo = cfg.ppo.for_stage(cfg.stage)  # n_samples may be null until resolved
        L = d.max_prompt_length + ppo.max_new_tokens
        B = ppo.rollout_batch_size * ppo.n_samples
        per_chunk = max(1, min(B, budget // L))  # consecutive_chunks: <= budget tokens
        mini = math.ceil(B / ppo.num_mini_batches)
        micro = max(1, min(mini, budget // L))  # pack_indices: <= budget tokens
        return Workload(
            cfg.stage, L, ppo.max_new_tokens, d.max_prompt_length, B, per_chunk, micro,
            math.ceil(mini / micro), ppo.ppo_epochs * ppo.num_mini_batches,
        )  # fmt: skip
    L, P = d.max_length, d.max_prompt_length
    per = 2 if cfg.stage in ("rm", "dpo") else 1  # a pair packs both of its sequences
    micro = max(1, min(cfg.train.batch_size, budget // (per * L)))
    steps = math.ceil(cfg.train.batch_size / micro)
    return Workload(cfg.stage, L, L - P, P, 0, 0, micro, steps, 1)


@dataclass
class Models:
    policy: torch.nn.Module | None = None  # PolicyModel (trained; RM: None)
    reference: torch.nn.Module | None = None  # frozen PolicyModel
    reward: torch.nn.Module | None = None  # frozen ValueModel
    critic: torch.nn.Module | None = None  # trained ValueModel (PPO critic, RM model)
    optimizers: list = dataclasses.field(default_factory=list)

    def trained(self) -> list[torch.nn.Module]:
        return [m for m in (self.policy, self.critic) if m is not None]

    def frozen(self) -> list[torch.nn.Module]:
        return [m for m in (self.reference, self.reward) if m is not None]


def _dtype(cfg: RunConfig) -> torch.dtype:
    from fastrlhf.trainers.loading import weights_dtype

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        weights_dtype(cfg.model)
    ]


def _materialise(module: torch.nn.Module, fake: bool) -> torch.nn.Module:
    """Meta parameters and buffers -> empty CPU tensors (fake ones under the caller's
    FakeTensorMode). By hand rather than ``to_empty``: shared (tied) tensors stay one
    object, and no tensor swap is needed."""
    if not fake:
        return module
    done: dict[int, torch.Tensor] = {}

    def empty(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            new = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            if isinstance(t, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
            done[id(t)] = new
        return done[id(t)]

    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for key, t in table.items():
                if t is not None:
                    table[key] = empty(t)
    return module


def _causal_lm(hf_cfg, dtype, fake: bool):
    from transformers import AutoModelForCausalLM

    with torch.device("meta" if fake else "cpu"):
        return AutoModelForCausalLM.from_config(
            hf_cfg, dtype=dtype, attn_implementation=_attention()
        )


def _backbone(hf_cfg, dtype, fake: bool):
    from transformers import AutoModel

    with torch.device("meta" if fake else "cpu"):
        return AutoModel.from_config(hf_cfg, dtype=dtype, attn_implementation=_attention())


def _policy(cfg: RunConfig, hf_cfg, trainable: bool, fake: bool):
    from fastrlhf.models import PolicyModel
    from fastrlhf.models.loading import enable_gradient_checkpointing

    lm = _causal_lm(hf_cfg, _dtype(cfg), fake)
    lm.config.use_cache = False
    if trainable and cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    policy = _materialise(PolicyModel(lm, vocab_size=int(hf_cfg.vocab_size)), fake)
    if not trainable:
        from fastrlhf.trainers.loading import frozen

        policy = frozen(policy)
    return policy


def _value(cfg: RunConfig, hf_cfg, trainable: bool, fake: bool):
    from fastrlhf.models import ValueModel
    from fastrlhf.models.loading import enable_gradient_checkpointing

    backbone = _backbone(hf_cfg, _dtype(cfg), fake)
    backbone.config.use_cache = False
    if trainable and cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    model = _materialise(ValueModel(backbone), fake)
    if not trainable:
        from fastrlhf.trainers.loading import frozen

        model = frozen(model)
    return model


def build_models(cfg: RunConfig, hf_cfg, value_cfg=None, *, fake: bool = True) -> Models:
    """The modules a ``cfg.stage`` run keeps, with optimizer states (call under the fake
    mode when ``fake``). ``value_cfg``: the reward model / critic shape (default: hf_cfg)."""
    from fastrlhf.trainers.optim import build_optimizer

    if cfg.model.lora_rank:
        raise ValueError("model.lora_rank > 0: the estimate covers full fine-tuning only")
    value_cfg = value_cfg or hf_cfg
    m, stage = Models(), cfg.stage
    if stage != "rm":
        m.policy = _policy(cfg, hf_cfg, True, fake)
    if stage in RL_STAGES:
        ppo = cfg.ppo.for_stage(cfg.stage)  # kind may be null until resolved
        if ppo.uses_reference:
            m.reference = _policy(cfg, hf_cfg, False, fake)
        if ppo.reward_fn is None:  # a reward model unless a reward function is named
            m.reward = _value(cfg, value_cfg, False, fake)
        if ppo.kind == "ppo":
            m.critic = _value(cfg, value_cfg, True, fake)
    elif stage == "rm":
        m.critic = _value(cfg, value_cfg, True, fake)
    elif (
        stage == "dpo"
        and cfg.dpo.reference == "online"
        and cfg.dpo.kind in ("sigmoid", "ipo", "hinge")
    ):
        m.reference = _policy(cfg, hf_cfg, False, fake)
    cuda = torch.device("cuda")  # the optimizer the trainer builds on a GPU ("auto": fused)
    for module in m.trained():
        optim = cfg.optim
        if stage in RL_STAGES and module is m.critic:
            optim = dataclasses.replace(optim, lr=cfg.ppo.critic_lr)
        m.optimizers.append(build_optimizer(module, optim, cuda))
    _create_optimizer_states(m)
    return m


def _attention() -> str:
    from fastrlhf.estimate.measure import register_estimate_attention

    return register_estimate_attention()


def _create_optimizer_states(m: Models) -> None:
    """One step on zero gradients: AdamW allocates its states lazily, at the first step."""
    for module, opt in zip(m.trained(), m.optimizers):
        for p in module.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
