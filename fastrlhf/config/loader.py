"""Reading a RunConfig: YAML files (with the line of every key), dotted command-line
overrides, and the conversion of plain values to the schema's types.

RunConfig = defaults <- YAML file <- ``key.sub=value`` overrides <- fixed values, then
the rules (``fastrlhf.config.rules``). An unknown key or a value of the wrong type is a
``ConfigError`` that names the dotted key and, for YAML, the file and line.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from fastrlhf.config.rules import validate
from fastrlhf.config.schema import ConfigError, RunConfig


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
        return value  # its choices are a rule (fastrlhf.config.rules), checked once there
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


def build_dataclass(cls: type, data: dict, prefix: str, where: dict[str, str]) -> Any:
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
            kwargs[name] = build_dataclass(tp, value, key + ".", where)
        else:
            kwargs[name] = _coerce(value, tp, key, where.get(key, ""))
    return cls(**kwargs)


def merge_dicts(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
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
    return validate(build_dataclass(RunConfig, data, "", where), where)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, **fixed: Any
) -> RunConfig:
    """RunConfig = defaults <- YAML file at ``path`` <- dotted ``overrides`` <- ``fixed``."""
    where: dict[str, str] = {}
    data = read_yaml(path, where) if path is not None else {}
    data = merge_dicts(data, parse_overrides(overrides or [], where))
    data = merge_dicts(data, fixed)
    return run_config_from_dict(data, where)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
