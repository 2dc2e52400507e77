"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

One tree describes a run of any stage::

    RunConfig
      stage, run_dir, seed, device
      model       which weights, dtype, LoRA, gradient checkpointing
      data        where the records come from, lengths, how many
      optim       AdamW and the learning-rate schedule
      train       steps, batch sizes, accumulation, eval cadence, precision
      checkpoint  cadence, how many to keep
      logging     JSONL cadence, TensorBoard / W&B, plots
      sft, rm, dpo, ppo  stage-specific knobs (the grpo stage uses the ppo section)
      rollout     how rollouts are decoded (compiled decode step)

Every default is written once, here, as a dataclass field default. A YAML file and then
``key.sub=value`` overrides are applied on top; an unknown key or a value of the wrong
type is a ``ConfigError`` that names the dotted key and, for YAML, the file and line.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


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
    # loss = -log sigmoid(r_chosen - r_rejected - margin)
    margin: float = 0.0
    # bins of the expected-calibration-error estimate of sigmoid(margin)
    ece_bins: int = 10


@dataclass
class DPOConfig:
    kind: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"] = "sigmoid"
    # sigmoid/hinge: inverse temperature; ipo: 1/(2 beta) is the target margin;
    # simpo: scale of the length-normalised reward; orpo: weight of the odds-ratio term
    beta: float = 0.1
    # sigmoid and simpo only: probability that a preference label is flipped
    label_smoothing: float = 0.0
    # SimPO's target reward margin
    gamma: float = 0.5
    # "precompute": one pass over the data before training; "online": each step
    reference: Literal["precompute", "online"] = "precompute"
    # reference weights; null = the policy's initial weights (model.name_or_path)
    ref_model: str | None = None


PPO_KINDS = ("ppo", "grpo", "dr_grpo", "rloo", "reinforce++")
PPO_GROUP_KINDS = ("grpo", "dr_grpo", "rloo")


@dataclass
class PPOConfig:
    """The RL stage's knobs (the rest comes from RunConfig: model, data, optim, train...)."""

    # "ppo" (critic + GAE) or a critic-free estimator: grpo, dr_grpo, rloo, reinforce++
    kind: Literal["ppo", "grpo", "dr_grpo", "rloo", "reinforce++"] = "ppo"
    # ---- rollout: prompts per iteration, samples per prompt (>= 2 for group kinds)
    rollout_batch_size: int = 32
    n_samples: int = 1
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

    def validate(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ValueError(f"ppo.{key}={getattr(self, key)!r} must be {what}")

        need(self.kind in PPO_KINDS, "kind", f"one of {list(PPO_KINDS)}")
        need(self.rollout_batch_size >= 1, "rollout_batch_size", ">= 1")
        need(self.n_samples >= 1, "n_samples", ">= 1")
        if self.kind in PPO_GROUP_KINDS:
            need(self.n_samples >= 2, "n_samples", f">= 2 for kind={self.kind!r} (groups)")
        need(self.max_new_tokens >= 1, "max_new_tokens", ">= 1")
        need(self.kl_coef >= 0, "kl_coef", ">= 0")
        need(self.kl_target > 0, "kl_target", "> 0")
        need(self.kl_horizon > 0, "kl_horizon", "> 0")
        need(0 <= self.gamma <= 1, "gamma", "in [0, 1]")
        need(0 <= self.lam <= 1, "lam", "in [0, 1]")
        need(self.ppo_epochs >= 1, "ppo_epochs", ">= 1")
        need(self.num_mini_batches >= 1, "num_mini_batches", ">= 1")
        sequences = self.rollout_batch_size * self.n_samples
        need(
            self.num_mini_batches <= sequences,
            "num_mini_batches",
            f"<= rollout_batch_size * n_samples = {sequences}",
        )
        need(0 <= self.clip_low < 1, "clip_low", "in [0, 1)")
        need(self.clip_high >= 0, "clip_high", ">= 0")
        need(self.dual_clip is None or self.dual_clip > 1, "dual_clip", "> 1 or null")
        need(self.target_kl >= 0, "target_kl", ">= 0")
        need(self.reward_clip >= 0, "reward_clip", ">= 0")
        need(self.critic_lr > 0, "critic_lr", "> 0")
        need(self.value_clip is None or self.value_clip >= 0, "value_clip", ">= 0 or null")
        need(self.eval_max_new_tokens >= 1, "eval_max_new_tokens", ">= 1")

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
    stage: Literal["sft", "rm", "dpo", "ppo", "grpo"] = "sft"
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
    # ppo and grpo stages (grpo: a critic-free ppo.kind, grpo unless set otherwise)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


# ---------------------------------------------------------------------------------------
# value checks beyond types: (dotted key, predicate, what it must be)
_CHECKS: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("data.num_train", lambda v: v > 0, "> 0"),
    ("data.num_eval", lambda v: v >= 0, ">= 0"),
    ("data.embedded_max_operand", lambda v: v >= 1, ">= 1"),
    ("data.max_length", lambda v: v > 1, "> 1"),
    ("data.max_prompt_length", lambda v: v >= 1, ">= 1"),
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.eps", lambda v: v > 0, "> 0"),
    ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.max_grad_norm", lambda v: v >= 0, ">= 0"),
    ("train.max_steps", lambda v: v > 0, "> 0"),
    ("train.batch_size", lambda v: v > 0, "> 0"),
    ("train.micro_batch_tokens", lambda v: v > 0, "> 0"),
    ("train.eval_every", lambda v: v >= 0, ">= 0"),
    ("train.peak_tflops", lambda v: v >= 0, ">= 0"),
    ("train.cpu_threads", lambda v: v >= 0, ">= 0"),
    ("checkpoint.save_every", lambda v: v >= 0, ">= 0"),
    ("checkpoint.keep_last", lambda v: v >= 1, ">= 1"),
    ("logging.log_every", lambda v: v >= 1, ">= 1"),
    ("model.lora_rank", lambda v: v >= 0, ">= 0"),
    ("model.lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("rm.ece_bins", lambda v: v >= 1, ">= 1"),
    ("dpo.beta", lambda v: v > 0, "> 0"),
    ("dpo.label_smoothing", lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    ("device", lambda v: v == "auto" or v == "cpu" or v.startswith("cuda"), "auto|cpu|cuda[:i]"),
]


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: RunConfig, where: dict[str, str] | None = None) -> RunConfig:
    """Range checks that types cannot express; raises ConfigError naming the key."""
    where = where or {}
    for key, ok, what in _CHECKS:
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} must be {what}{where.get(key, '')}")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        key = "data.max_prompt_length"
        raise ConfigError(
            f"{key}={cfg.data.max_prompt_length} must be < data.max_length="
            f"{cfg.data.max_length} so every response keeps a token{where.get(key, '')}"
        )
    if cfg.stage == "grpo" and cfg.ppo.kind == "ppo":
        # the grpo stage's defaults: the GRPO estimator over groups of 4 samples per prompt
        n = cfg.ppo.n_samples if cfg.ppo.n_samples > 1 else 4
        cfg.ppo = dataclasses.replace(cfg.ppo, kind="grpo", n_samples=n)
    if cfg.stage in ("ppo", "grpo"):
        try:
            cfg.ppo.validate()
        except ValueError as e:
            key = str(e).split("=", 1)[0]
            raise ConfigError(f"{e}{where.get(key, '')}") from e
    return cfg


# ---------------------------------------------------------------------------------------
# building dataclasses from plain dicts, with types checked


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """``value`` converted to the annotated type ``tp`` or a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise (
            errors[0]
            if len(errors) == 1
            else ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}{where}")
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}{where}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}{where}")
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}{where}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}{where}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}{where}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}{where}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}")  # pragma: no cover


def _build(cls: type, data: dict, prefix: str, where: dict[str, str]) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}"
            f"{where.get(prefix.rstrip('.'), '')}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown key {key!r}{where.get(key, '')}{hint}; "
                f"valid keys under {prefix.rstrip('.') or 'the top level'}: {sorted(fields)}"
            )
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".", where)
        else:
            kwargs[name] = _coerce(value, tp, key, where.get(key, ""))
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------
# YAML with line numbers, and dotted overrides


def _compose(node: yaml.Node, path: str, file: str, where: dict[str, str]) -> Any:
    """Python value of a YAML node; records ``file:line`` of every dotted key in ``where``."""
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            dotted = f"{path}.{key}" if path else key
            if key in out:
                raise ConfigError(
                    f"duplicate key {dotted!r} ({file}, line {key_node.start_mark.line + 1})"
                )
            where[dotted] = f" ({file}, line {key_node.start_mark.line + 1})"
            out[key] = _compose(value_node, dotted, file, where)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_compose(v, path, file, where) for v in node.value]
    # scalars: let the safe loader resolve the tag (int, float, bool, null, str)
    return yaml.safe_load(yaml.serialize(node))


def read_yaml(path: str | Path, where: dict[str, str] | None = None) -> dict:
    """A YAML mapping from ``path``; ``where`` receives ``dotted key -> (file, line N)``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    where = {} if where is None else where
    try:
        node = yaml.compose(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if node is None:
        return {}
    data = _compose(node, "", str(path), where)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def parse_overrides(items: list[str], where: dict[str, str] | None = None) -> dict:
    """``["optim.lr=1e-4", "train.bf16=false"]`` -> nested dict; values parsed as YAML."""
    where = {} if where is None else where
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse the value: {e}") from e
        where[key] = f" (command-line override {item!r})"
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def run_config_from_dict(data: dict, where: dict[str, str] | None = None) -> RunConfig:
    where = where or {}
    return validate(_build(RunConfig, data, "", where), where)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, **fixed: Any
) -> RunConfig:
    """RunConfig = defaults <- YAML file at ``path`` <- dotted ``overrides`` <- ``fixed``."""
    where: dict[str, str] = {}
    data = read_yaml(path, where) if path is not None else {}
    data = _merge(data, parse_overrides(overrides or [], where))
    data = _merge(data, fixed)
    return run_config_from_dict(data, where)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------
# the demo pipeline: one file, a ``common`` RunConfig part and one part per stage


@dataclass
class DemoSettings:
    run_dir: str = "runs/demo"
    # stages run in this order; each later stage starts from the SFT model
    stages: list[str] = field(default_factory=lambda: ["sft", "rm", "dpo"])
    # held-out prompts scored with the gold checker after each stage (greedy decoding)
    eval_prompts: int = 128
    max_new_tokens: int = 8
    # seed of the held-out arithmetic prompts
    eval_seed: int = 777


DEMO_STAGES = ("sft", "rm", "dpo", "ppo", "grpo")


def load_demo_config(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[DemoSettings, dict[str, RunConfig]]:
    """(demo settings, {stage: RunConfig}) from a demo file + ``section.key=value`` overrides.

    The file has a ``demo`` section (DemoSettings), a ``common`` section (any RunConfig
    keys, shared by every stage) and one section per stage (RunConfig keys that override
    ``common`` for that stage). Each stage's run_dir is ``<demo.run_dir>/<stage>``.
    """
    where: dict[str, str] = {}
    data = read_yaml(path, where)
    data = _merge(data, parse_overrides(overrides or [], where))
    allowed = {"demo", "common", *DEMO_STAGES}
    for key in data:
        if key not in allowed:
            raise ConfigError(
                f"unknown key {key!r}{where.get(key, '')}; a demo file has sections "
                f"{sorted(allowed)}"
            )
    demo = _build(DemoSettings, data.get("demo") or {}, "demo.", where)
    for i, s in enumerate(demo.stages):
        if s not in DEMO_STAGES:
            raise ConfigError(
                f"demo.stages[{i}]={s!r} is not one of {list(DEMO_STAGES)}"
                f"{where.get('demo.stages', '')}"
            )
    common = data.get("common") or {}
    configs = {}
    for stage in DEMO_STAGES:
        part = data.get(stage) or {}
        # keys of a stage section are reported as "<stage>.<key>" with their line
        stage_where = dict(where)
        for k, v in where.items():
            for prefix in ("common.", f"{stage}."):
                if k.startswith(prefix):
                    stage_where[k[len(prefix) :]] = v
        merged = _merge(_merge(common, part), {"stage": stage})
        merged["run_dir"] = str(Path(demo.run_dir) / stage)
        try:
            configs[stage] = run_config_from_dict(merged, stage_where)
        except ConfigError as e:
            raise ConfigError(f"demo stage {stage!r}: {e}") from e
    return demo, configs
