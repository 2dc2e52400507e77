"""Model shapes for the estimate: built-in presets of public configs, or a local config.json.

The presets copy the shape-defining fields of each model's published ``config.json``
(nothing is downloaded). Only shapes matter to a memory estimate; values that change no
tensor size (token ids, init ranges) are left at the transformers defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

_QWEN2 = dict(
    model_type="qwen2",
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    attention_dropout=0.0,
    use_sliding_window=False,
)

PRESETS: dict[str, dict] = {
    "Qwen2.5-0.5B": dict(
        _QWEN2,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "Qwen2.5-1.5B": dict(
        _QWEN2,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "Qwen2.5-7B": dict(
        _QWEN2,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
    "Llama-3.1-8B": dict(
        model_type="llama",
        hidden_act="silu",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
    ),
}

# accepted spellings: "Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b", "meta-llama/Llama-3.1-8B"
_ALIASES = {name.lower(): name for name in PRESETS}


def preset_name(spec: str) -> str | None:
    """The preset ``spec`` names (case-insensitive, an ``org/`` prefix allowed), or None."""
    key = spec.strip().lower().rsplit("/", 1)[-1]
    return _ALIASES.get(key)


def model_config_dict(spec: str) -> tuple[str, dict]:
    """(display name, config dict) for a preset name, a config.json or a directory with one."""
    name = preset_name(spec)
    if name is not None:
        return name, dict(PRESETS[name])
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json "
            "(or a directory holding one)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{path}: a model config.json needs a 'model_type' key")
    return str(path.parent.name or path), data


def hf_config(data: dict):
    """A transformers config object from a config dict (keyed by its ``model_type``)."""
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        data.pop(key, None)
    return AutoConfig.for_model(model_type, **data)
