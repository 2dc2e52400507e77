"""Every rule a configuration value must follow beyond its type, written once.

``RULES`` holds one row per rule: the dotted key, a predicate of (value, its section) and
what the value must be. The allowed values of a ``Literal`` field are its type
(``fastrlhf.config.schema``) and are checked here too, so a config built in code meets
the same rules as one read from YAML. ``validate`` (a whole RunConfig, as loaded) and
``check_section`` (one section, e.g. a ``PPOConfig`` built by a caller) apply them and
raise ``ConfigError`` naming the key, and for YAML the file and line.

The ``ppo`` section is checked only for the RL stages, after its nulls are made explicit
for the stage (``PPOConfig.for_stage``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from fastrlhf.config.schema import PPO_GROUP_KINDS, RL_STAGES, ConfigError, RunConfig


def _sequences(ppo) -> int:
    return ppo.rollout_batch_size * ppo.n_samples


# (dotted key, ok(value, section), what it must be: text, or text from the section)
RULES: list[tuple[str, Callable[[Any, Any], bool], str | Callable[[Any], str]]] = [
    ("device", lambda v, _: v in ("auto", "cpu") or v.startswith("cuda"), "auto|cpu|cuda[:i]"),
    ("model.lora_rank", lambda v, _: v >= 0, ">= 0"),
    ("model.lora_dropout", lambda v, _: 0 <= v < 1, "in [0, 1)"),
    ("data.num_train", lambda v, _: v > 0, "> 0"),
    ("data.num_eval", lambda v, _: v >= 0, ">= 0"),
    ("data.embedded_max_operand", lambda v, _: v >= 1, ">= 1"),
    ("data.max_length", lambda v, _: v > 1, "> 1"),
    ("data.max_prompt_length", lambda v, _: v >= 1, ">= 1"),
    (
        "data.max_prompt_length",
        lambda v, d: v < d.max_length,
        lambda d: f"< data.max_length={d.max_length} so every response keeps a token",
    ),
    ("optim.lr", lambda v, _: v > 0, "> 0"),
    ("optim.weight_decay", lambda v, _: v >= 0, ">= 0"),
    ("optim.beta1", lambda v, _: 0 <= v < 1, "in [0, 1)"),
    ("optim.beta2", lambda v, _: 0 <= v < 1, "in [0, 1)"),
    ("optim.eps", lambda v, _: v > 0, "> 0"),
    ("optim.warmup_steps", lambda v, _: v >= 0, ">= 0"),
    ("optim.min_lr_ratio", lambda v, _: 0 <= v <= 1, "in [0, 1]"),
    ("optim.max_grad_norm", lambda v, _: v >= 0, ">= 0"),
    ("train.max_steps", lambda v, _: v > 0, "> 0"),
    ("train.batch_size", lambda v, _: v > 0, "> 0"),
    ("train.micro_batch_tokens", lambda v, _: v > 0, "> 0"),
    ("train.eval_every", lambda v, _: v >= 0, ">= 0"),
    ("train.peak_tflops", lambda v, _: v >= 0, ">= 0"),
    ("train.cpu_threads", lambda v, _: v >= 0, ">= 0"),
    ("checkpoint.save_every", lambda v, _: v >= 0, ">= 0"),
    ("checkpoint.keep_last", lambda v, _: v >= 1, ">= 1"),
    ("logging.log_every", lambda v, _: v >= 1, ">= 1"),
    ("rm.ece_bins", lambda v, _: v >= 1, ">= 1"),
    ("dpo.beta", lambda v, _: v > 0, "> 0"),
    ("dpo.label_smoothing", lambda v, _: 0 <= v < 0.5, "in [0, 0.5)"),
    ("ppo.rollout_batch_size", lambda v, _: v >= 1, ">= 1"),
    ("ppo.n_samples", lambda v, _: v >= 1, ">= 1"),
    (
        "ppo.n_samples",
        lambda v, p: p.kind not in PPO_GROUP_KINDS or v >= 2,
        lambda p: f">= 2 for kind={p.kind!r} (groups)",
    ),
    ("ppo.max_new_tokens", lambda v, _: v >= 1, ">= 1"),
    ("ppo.kl_coef", lambda v, _: v >= 0, ">= 0"),
    ("ppo.kl_target", lambda v, _: v > 0, "> 0"),
    ("ppo.kl_horizon", lambda v, _: v > 0, "> 0"),
    ("ppo.gamma", lambda v, _: 0 <= v <= 1, "in [0, 1]"),
    ("ppo.lam", lambda v, _: 0 <= v <= 1, "in [0, 1]"),
    ("ppo.ppo_epochs", lambda v, _: v >= 1, ">= 1"),
    ("ppo.num_mini_batches", lambda v, _: v >= 1, ">= 1"),
    (
        "ppo.num_mini_batches",
        lambda v, p: v <= _sequences(p),
        lambda p: f"<= rollout_batch_size * n_samples = {_sequences(p)}",
    ),
    ("ppo.clip_low", lambda v, _: 0 <= v < 1, "in [0, 1)"),
    ("ppo.clip_high", lambda v, _: v >= 0, ">= 0"),
    ("ppo.dual_clip", lambda v, _: v is None or v > 1, "> 1 or null"),
    ("ppo.target_kl", lambda v, _: v >= 0, ">= 0"),
    ("ppo.reward_clip", lambda v, _: v >= 0, ">= 0"),
    ("ppo.critic_lr", lambda v, _: v > 0, "> 0"),
    ("ppo.value_clip", lambda v, _: v is None or v >= 0, ">= 0 or null"),
    ("ppo.eval_max_new_tokens", lambda v, _: v >= 1, ">= 1"),
]


def _literal_choices(tp: Any) -> tuple | None:
    """The choices of ``Literal[...]`` or ``Literal[...] | None`` (None included)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        lits = [a for a in args if typing.get_origin(a) is Literal]
        if lits and all(a is type(None) or a in lits for a in args):
            return sum((typing.get_args(a) for a in lits), ()) + (None,)
    return None


def _check_literals(obj: Any, prefix: str, where: dict[str, str]) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            continue  # sections are checked on their own
        choices = _literal_choices(hints[f.name])
        if choices is not None and value not in choices:
            shown = [c for c in choices if c is not None]
            raise ConfigError(f"{key}: {value!r} is not one of {shown}{where.get(key, '')}")


def check_section(obj: Any, section: str, where: dict[str, str] | None = None) -> None:
    """The rules of one section (``section`` = "ppo", "optim", ..., or "" for the top
    level) on ``obj``; raises ConfigError naming the first broken one."""
    where = where or {}
    _check_literals(obj, f"{section}." if section else "", where)
    for key, ok, what in RULES:
        head, _, name = key.rpartition(".")
        if head != section:
            continue
        value = getattr(obj, name)
        if not ok(value, obj):
            text = what if isinstance(what, str) else what(obj)
            raise ConfigError(f"{key}={value!r} must be {text}{where.get(key, '')}")


def validate(cfg: RunConfig, where: dict[str, str] | None = None) -> RunConfig:
    """Every section's rules (the ppo section's only for the RL stages, its nulls made
    explicit for the stage first); raises ConfigError naming the key."""
    where = where or {}
    if cfg.stage in RL_STAGES:
        try:
            cfg.ppo = cfg.ppo.for_stage(cfg.stage)
        except ConfigError as e:
            raise ConfigError(f"{e}{where.get('ppo.kind', '')}") from None
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and (f.name != "ppo" or cfg.stage in RL_STAGES):
            check_section(value, f.name, where)
    check_section(cfg, "", where)
    return cfg
