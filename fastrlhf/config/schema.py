"""The typed run configuration: one dataclass tree describes a run of any stage.

    RunConfig
      stage, run_dir, seed, device
      model       which weights, dtype, LoRA, gradient checkpointing
      data        where the records come from, lengths, how many
      optim       AdamW and the learning-rate schedule
      train       steps, batch sizes, eval cadence, precision
      checkpoint  cadence, how many to keep
      logging     JSONL cadence, TensorBoard / W&B, plots
      sft, rm, dpo, ppo  stage-specific knobs (the grpo stage uses the ppo section)
      rollout     how rollouts are decoded (compiled decode step)

Every default is written once, here, as a dataclass field default; the allowed values
of a Literal are its type. Range rules live in ``fastrlhf.config.rules``, reading YAML
and overrides in ``fastrlhf.config.loader``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

# the stages, written once: the command line, the trainers and the demo read them here
StageName = Literal["sft", "rm", "dpo", "ppo", "grpo"]
STAGES: tuple[str, ...] = typing.get_args(StageName)
RL_STAGES = ("ppo", "grpo")  # both train fastrlhf.trainers.ppo.PPOStage


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key (and file:line)."""


@dataclass
class ModelConfig:
    # "embedded" builds the tiny model shipped with fastrlhf (fastrlhf.data.embedded).
    name_or_path: str = "embedded"
    # "auto": float32 master weights; on CUDA the bf16 math comes from autocast (train.bf16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    gradient_checkpointing: bool = False
    attn_impl: str = "auto"
    # the packed-attention path when attn_impl is "auto" (fastrlhf.models.attention):
    # "auto" picks per model and device; an explicit path that cannot serve the model
    # (e.g. torch_varlen on a soft-capped one, anything but sdpa/eager on CPU) is refused
    attention: Literal["auto", "flash_attn", "torch_varlen", "flex", "sdpa", "eager"] = "auto"
    # num_splits=1 in the varlen kernels: bitwise batch-invariant attention, lower throughput
    attention_batch_invariant: bool = False
    # at load, compare the trainer's log-probs with the HF model's own logits on a few
    # tokens and refuse a mismatch (an unknown post-head transform); false skips it
    logit_probe: bool = True
    # seed of the embedded model's random initialisation
    embedded_seed: int = 0


@dataclass
class DataConfig:
    # "embedded" = the arithmetic task in fastrlhf.data.embedded; otherwise a path or a
    # dataset name understood by fastrlhf.data.load_records.
    source: str = "embedded"
    train_split: str = "train"
    eval_split: str = "test"
    # records drawn from the embedded task (ignored for other sources)
    num_train: int = 2048
    num_eval: int = 128
    # operands of the embedded arithmetic task are 0..embedded_max_operand
    embedded_max_operand: int = 20
    # prompt + response tokens; prompts longer than max_prompt_length keep their end
    max_length: int = 256
    max_prompt_length: int = 128
    # malformed records: "skip" (one warning with the count) or "error"
    on_malformed: Literal["skip", "error"] = "skip"
    seed: int = 1234


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # "auto": fused AdamW on CUDA, foreach elsewhere
    impl: Literal["auto", "fused", "foreach", "single"] = "auto"
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    # the schedule decays to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    # 0 disables clipping (the norm is still measured and logged)
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    max_steps: int = 100
    # sequences (SFT) or pairs (RM, DPO) per optimizer step, over all micro-batches
    batch_size: int = 16
    # micro-batches are packed up to this many tokens (no padding)
    micro_batch_tokens: int = 4096
    eval_every: int = 50
    # also evaluate before the first step, the baseline later evals compare with;
    # null: the stage's default (the RL stages do, when eval_every > 0; SFT/RM/DPO do not)
    eval_at_start: bool | None = None
    # a bf16 autocast region around forward passes on CUDA; ignored on CPU
    bf16: bool = True
    # used for the MFU estimate when the device is not in the built-in table (0: not logged)
    peak_tflops: float = 0.0
    progress_bar: bool = True
    # torch intra-op threads on CPU (0: torch's default). Tiny models on a shared CPU run
    # several times faster with 1: thread hand-offs cost more than the ops themselves
    cpu_threads: int = 0


@dataclass
class CheckpointConfig:
    # 0: only at the end of training
    save_every: int = 0
    keep_last: int = 2
    # also write the final model to <run_dir>/final (HF format)
    save_final: bool = True


@dataclass
class LoggingConfig:
    log_every: int = 10
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "fastrlhf"
    plots: bool = True


@dataclass
class SFTConfig:
    pass


@dataclass
class RMConfig:
    # "pairwise": every preference row is one example, loss = -log sigmoid(r_chosen -
    # r_rejected - margin) averaged over pairs; "ranking": rows sharing a ``group`` id (the
    # pairs of one ranking, as ``fastrlhf feedback export`` writes) are one example
    # trained together, loss = mean over groups of the mean over the group's pairs
    # (InstructGPT), so train.batch_size counts groups; rows without a group are their own
    loss: Literal["pairwise", "ranking"] = "pairwise"
    # loss = -log sigmoid(r_chosen - r_rejected - margin)
    margin: float = 0.0
    # bins of the expected-calibration-error estimate of sigmoid(margin)
    ece_bins: int = 10


@dataclass
class DPOConfig:
    kind: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo", "tdpo1", "tdpo2"] = "sigmoid"
    # sigmoid/hinge/tdpo*: inverse temperature; ipo: 1/(2 beta) is the target margin;
    # simpo: scale of the length-normalised reward; orpo: weight of the odds-ratio term
    beta: float = 0.1
    # sigmoid and simpo only: probability that a preference label is flipped
    label_smoothing: float = 0.0
    # SimPO's target reward margin
    gamma: float = 0.5
    # TDPO2's weight of the sequential-KL difference (tdpo1 has none)
    alpha: float = 0.5
    # "precompute": one pass over the data before training; "online": each step
    reference: Literal["precompute", "online"] = "precompute"
    # reference weights; null = the policy's initial weights (model.name_or_path)
    ref_model: str | None = None


PPOKind = Literal["ppo", "grpo", "dr_grpo", "rloo", "reinforce++"]
PPO_KINDS: tuple[str, ...] = typing.get_args(PPOKind)
PPO_GROUP_KINDS = ("grpo", "dr_grpo", "rloo")  # a baseline over each prompt's samples


@dataclass
class PPOConfig:
    """The RL stage's knobs (the rest comes from RunConfig: model, data, optim, train...)."""

    # "ppo" (critic + GAE) or a critic-free estimator: grpo, dr_grpo, rloo, reinforce++;
    # null: the stage's own (ppo for the ppo stage, grpo for the grpo stage)
    kind: PPOKind | None = None
    # ---- rollout: prompts per iteration, samples per prompt (>= 2 for group kinds)
    rollout_batch_size: int = 32
    # null: 4 for the group kinds (grpo, dr_grpo, rloo), else 1
    n_samples: int | None = None
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # ---- reward: a ValueModel directory, or "package.module:function"; exactly one
    reward_model: str | None = None
    reward_fn: str | None = None
    # reward model scores -> (r - reward_mean) / reward_std with its stored statistics
    normalize_reward: bool = True
    # |score| clipped to this (0: off)
    reward_clip: float = 0.0
    # ---- KL to the reference: in the reward (k1, fixed/adaptive beta), in the loss (k3)
    kl_placement: Literal["reward", "loss", "none"] = "reward"
    kl_coef: float = 0.05
    # estimator used when kl_placement="loss" (see ops.kl_penalty)
    kl_kind: str = "k3"
    adaptive_kl: bool = False
    # adaptive controller: target KL (nats per sequence) and horizon (samples)
    kl_target: float = 6.0
    kl_horizon: int = 10000
    # reference weights; null: the initial policy (model.name_or_path), or with LoRA the
    # policy with its adapter disabled
    ref_model: str | None = None
    # keep the reference / reward model on the host between uses
    offload_models: bool = False
    # ---- advantages
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    # ---- update
    ppo_epochs: int = 1
    num_mini_batches: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    entropy_coef: float = 0.0
    # stop the iteration's update when a mini-batch's approx KL(old || new) exceeds this
    # (0: off); each check is a host sync
    target_kl: float = 0.0
    # recompute old log-probs with a training-layout forward (else: generation's)
    recompute_old_logprobs: bool = True
    # ---- critic (kind="ppo"): weights from critic_model, else the reward model, else
    # the policy's backbone with a fresh head
    critic_model: str | None = None
    critic_lr: float = 1e-4
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    # ---- implementation switches (benchmark comparison)
    fused_ops: bool = True
    memory_reuse: bool = True
    offload_optimizer: bool = False
    # ---- evaluation: greedy answers to the held-out prompts (data.num_eval)
    eval_max_new_tokens: int = 8

    def for_stage(self, stage: str) -> PPOConfig:
        """This section with its nulls made explicit for ``stage`` ("ppo" or "grpo"):
        kind null -> the stage's estimator, n_samples null -> 4 for the group kinds (a
        group needs several samples of a prompt), else 1. A value the user set is never
        changed: the critic-free grpo stage with ``kind: ppo`` is an error."""
        if stage == "grpo" and self.kind == "ppo":
            raise ConfigError(
                "ppo.kind='ppo' needs a critic, which the grpo stage does not train: use "
                f"stage ppo, or one of {list(PPO_KINDS[1:])} (or null) for ppo.kind"
            )
        kind = self.kind if self.kind is not None else ("grpo" if stage == "grpo" else "ppo")
        n = self.n_samples
        if n is None:
            n = 4 if kind in PPO_GROUP_KINDS else 1
        return dataclasses.replace(self, kind=kind, n_samples=n)

    @property
    def uses_reference(self) -> bool:
        return self.kl_placement != "none" and self.kl_coef > 0


@dataclass
class RolloutConfig:
    # the decode step compiled (torch.compile, + CUDA graphs on CUDA): "auto" = on for
    # CUDA, off for CPU. YAML reads a bare on/off as a boolean, so true/false mean on/off
    compile: Literal["auto", "on", "off", True, False] = "auto"


@dataclass
class RunConfig:
    stage: StageName = "sft"
    run_dir: str = "runs/default"
    seed: int = 0
    # "auto": cuda when available, else cpu
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    # the ppo and grpo stages (grpo: a critic-free ppo.kind; see PPOConfig.for_stage)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
