"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

    schema.py         the dataclasses (RunConfig and its sections), the stage names
    rules.py          every range / cross-field rule, and the checks applying them
    loader.py         YAML with file:line per key, ``key.sub=value`` overrides, types
    demo_settings.py  the demo pipeline's file (``fastrlhf demo``)

Importing from ``fastrlhf.config`` gives all of them.
"""

from __future__ import annotations

from fastrlhf.config.demo_settings import DEMO_STAGES, DemoSettings, load_demo_config
from fastrlhf.config.loader import (
    load_config,
    parse_overrides,
    read_yaml,
    run_config_from_dict,
    save_config,
    to_dict,
)
from fastrlhf.config.rules import RULES, check_section, validate
from fastrlhf.config.schema import (
    PPO_GROUP_KINDS,
    PPO_KINDS,
    RL_STAGES,
    STAGES,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DPOConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    PPOConfig,
    RMConfig,
    RolloutConfig,
    RunConfig,
    SFTConfig,
    StageName,
    TrainConfig,
)

__all__ = [
    "DEMO_STAGES",
    "PPO_GROUP_KINDS",
    "PPO_KINDS",
    "RL_STAGES",
    "RULES",
    "STAGES",
    "CheckpointConfig",
    "ConfigError",
    "DPOConfig",
    "DataConfig",
    "DemoSettings",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "PPOConfig",
    "RMConfig",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "StageName",
    "TrainConfig",
    "check_section",
    "load_config",
    "load_demo_config",
    "parse_overrides",
    "read_yaml",
    "run_config_from_dict",
    "save_config",
    "to_dict",
    "validate",
]
