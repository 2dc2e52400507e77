"""The models of an RL run: the trained policy (and critic for PPO), the frozen reference
and reward model, loaded from a RunConfig and its ``ppo`` section.

The reference follows the one rule of ``fastrlhf.trainers.loading.load_reference``; the
critic starts from ``ppo.critic_model``, else the reward model (its backbone already
reads responses for quality), else the policy's backbone with a fresh head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrlhf.config import PPOConfig, RunConfig
from fastrlhf.trainers.loading import (
    frozen,
    load_policy_for,
    load_reference,
    model_path,
    weights_dtype,
)
from fastrlhf.trainers.rewards import RewardFn, load_reward_function


class TrainedModules(torch.nn.Module):
    """The modules a checkpoint holds: the policy, and the critic for PPO."""

    def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module | None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic


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
    models.reference = load_reference(
        cfg, policy, ppo.ref_model, path, device, needed=ppo.uses_reference
    )
    m = cfg.model
    value_kwargs = dict(
        dtype=weights_dtype(m),
        device=device,
        trust_remote_code=m.trust_remote_code,
        attn_impl=m.attn_impl,
        attention=m.attention,
        batch_invariant_attention=m.attention_batch_invariant,
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


def _check_same_vocab(policy_tok, reward_tok, where: str) -> None:
    """The reward model scores the policy's token ids as they are: same vocabulary needed."""
    if reward_tok is None:
        return
    if policy_tok.get_vocab() != reward_tok.get_vocab():
        raise ValueError(
            f"ppo.reward_model={where!r} uses a different tokenizer vocabulary than the policy "
            f"({len(reward_tok)} vs {len(policy_tok)} tokens); re-tokenisation is not supported"
        )
