"""Config: defaults, YAML + dotted overrides, and errors that name the key (and file:line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastrlhf.config import (
    ConfigError,
    RunConfig,
    load_config,
    load_demo_config,
    parse_overrides,
    save_config,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_dataclass_defaults():
    assert load_config() == RunConfig()


def test_yaml_then_overrides_then_types(tmp_path):
    path = _write(
        tmp_path, "stage: rm\noptim:\n  lr: 1.0e-3\n  max_grad_norm: 2\ntrain:\n  bf16: false\n"
    )
    cfg = load_config(
        path, ["optim.lr=5e-4", "train.max_steps=7", "model.lora_target_modules=[q_proj, v_proj]"]
    )
    assert cfg.stage == "rm"
    assert cfg.optim.lr == 5e-4  # the override wins over the file
    assert cfg.optim.max_grad_norm == 2.0 and isinstance(cfg.optim.max_grad_norm, float)
    assert cfg.train.bf16 is False and cfg.train.max_steps == 7
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.dpo == RunConfig().dpo  # untouched sections keep their defaults


def test_unknown_key_names_key_file_and_line(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 1.0e-3\n  wieght_decay: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "'optim.wieght_decay'" in msg and "line 3" in msg and str(path) in msg
    assert "optim.weight_decay" in msg  # the suggestion


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'"),
        ("train.max_steps=ten", "train.max_steps: expected an integer"),
        ("train.max_steps=2.5", "train.max_steps: expected an integer"),
        ("train.bf16=maybe", "train.bf16: expected true/false"),
        ("optim.schedule=exp", "optim.schedule: 'exp' is not one of"),
        ("dpo.kind=kto", "dpo.kind: 'kto' is not one of"),
        ("optim.lr=-1", "optim.lr=-1.0 must be > 0"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be >= 1"),
        ("dpo.label_smoothing=0.7", "dpo.label_smoothing=0.7 must be in [0, 0.5)"),
        ("device=tpu", "device='tpu' must be"),
        ("optim=3", "optim: expected a mapping"),
        ("nokey", "must look like key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)
    if "=" in override and "mapping" not in fragment:
        assert "command-line override" in str(e.value) or "unknown key" in str(e.value)


def test_bad_value_in_file_names_line(tmp_path):
    path = _write(tmp_path, "train:\n  batch_size: 16\n  max_steps: 0\n")
    with pytest.raises(ConfigError, match=r"train.max_steps=0 must be > 0 \(.*line 3\)"):
        load_config(path)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="duplicate key 'optim.lr'.*line 3"):
        load_config(_write(tmp_path, "optim:\n  lr: 1\n  lr: 2\n"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "optim: [1, 2\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_optional_and_null(tmp_path):
    cfg = load_config(None, ["dpo.ref_model=some/dir"])
    assert cfg.dpo.ref_model == "some/dir"
    assert load_config(None, ["dpo.ref_model=null"]).dpo.ref_model is None


def test_save_config_round_trips(tmp_path):
    cfg = load_config(None, ["stage=dpo", "dpo.kind=ipo", "optim.lr=2e-4"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_overrides_parse_nested():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}


@pytest.mark.parametrize("name", ["sft.yaml", "rm.yaml", "dpo.yaml", "ppo.yaml", "grpo.yaml"])
def test_example_configs_load(name):
    cfg = load_config(EXAMPLES / name)
    assert cfg.stage == name.split(".")[0]


def test_demo_config(tmp_path):
    settings, configs = load_demo_config(EXAMPLES / "demo.yaml", ["sft.train.max_steps=3"])
    assert settings.stages == ["sft", "rm", "ppo", "dpo", "grpo"]
    assert configs["sft"].train.max_steps == 3
    assert {c.stage for c in configs.values()} == {"sft", "rm", "dpo", "ppo", "grpo"}
    for stage, c in configs.items():
        assert Path(c.run_dir) == Path(settings.run_dir) / stage
    bad = _write(tmp_path, "common:\n  seed: 1\nreinforce:\n  x: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'reinforce'.*line 3"):
        load_demo_config(bad)
    bad = _write(tmp_path, "common:\n  optim:\n    lr: 1\nrm:\n  optim:\n    lrr: 2\n")
    with pytest.raises(ConfigError, match="demo stage 'rm': unknown key 'optim.lrr'.*line 6"):
        load_demo_config(bad)
    with pytest.raises(ConfigError, match=r"demo.stages\[0\]='reinforce'"):
        load_demo_config(EXAMPLES / "demo.yaml", ["demo.stages=[reinforce]"])


def test_rl_stage_nulls_are_resolved_and_user_values_kept():
    # the grpo stage: kind and n_samples left null become the GRPO estimator over groups
    cfg = load_config(None, ["stage=grpo"])
    assert (cfg.ppo.kind, cfg.ppo.n_samples) == ("grpo", 4)
    cfg = load_config(None, ["stage=ppo"])
    assert (cfg.ppo.kind, cfg.ppo.n_samples) == ("ppo", 1)
    # values the user wrote are kept as written
    cfg = load_config(None, ["stage=grpo", "ppo.kind=rloo", "ppo.n_samples=3"])
    assert (cfg.ppo.kind, cfg.ppo.n_samples) == ("rloo", 3)
    cfg = load_config(None, ["stage=ppo", "ppo.kind=grpo"])
    assert (cfg.ppo.kind, cfg.ppo.n_samples) == ("grpo", 4)
    # ... and one that contradicts the stage is an error, not silently replaced
    with pytest.raises(ConfigError, match=r"ppo.kind='ppo' needs a critic.*command-line"):
        load_config(None, ["stage=grpo", "ppo.kind=ppo"])
    with pytest.raises(ConfigError, match=r"ppo.n_samples=1 must be >= 2 for kind='grpo'"):
        load_config(None, ["stage=grpo", "ppo.n_samples=1"])


def test_the_stage_list_is_the_schema_s():
    import typing

    from fastrlhf.cli import _parser
    from fastrlhf.config import DEMO_STAGES, STAGES
    from fastrlhf.trainers import STAGES as MODULES

    assert STAGES == typing.get_args(typing.get_type_hints(RunConfig)["stage"])
    assert tuple(MODULES) == STAGES and DEMO_STAGES == STAGES
    commands = _parser()._subparsers._group_actions[0].choices
    assert set(STAGES) < set(commands)
