"""The demo pipeline's file: a ``demo`` section (DemoSettings), a ``common`` RunConfig part
shared by every stage, and one RunConfig part per stage (``fastrlhf demo``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastrlhf.config.loader import (
    build_dataclass,
    merge_dicts,
    parse_overrides,
    read_yaml,
    run_config_from_dict,
)
from fastrlhf.config.schema import STAGES, ConfigError, RunConfig


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


DEMO_STAGES = STAGES  # every stage has a section in a demo file


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
    data = merge_dicts(data, parse_overrides(overrides or [], where))
    allowed = {"demo", "common", *DEMO_STAGES}
    for key in data:
        if key not in allowed:
            raise ConfigError(
                f"unknown key {key!r}{where.get(key, '')}; a demo file has sections "
                f"{sorted(allowed)}"
            )
    demo = build_dataclass(DemoSettings, data.get("demo") or {}, "demo.", where)
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
        merged = merge_dicts(merge_dicts(common, part), {"stage": stage})
        merged["run_dir"] = str(Path(demo.run_dir) / stage)
        try:
            configs[stage] = run_config_from_dict(merged, stage_where)
        except ConfigError as e:
            raise ConfigError(f"demo stage {stage!r}: {e}") from e
    return demo, configs


def default_demo_config() -> Path:
    """examples/demo.yaml, which setup.py installs as ``fastrlhf.examples`` (so an installed
    wheel has it too; the editable install maps it to the checkout's file)."""
    from importlib.resources import files

    return Path(str(files("fastrlhf.examples") / "demo.yaml"))
