"""Tiny random configs of the HF causal-LM families the trainer is tested on.

Every family that the installed transformers ships gets one (or two: with and without
sliding windows). Sizes are the smallest that still exercise GQA (4 query heads over 2
key/value heads), sliding windows shorter than the test sequences (window 4), and the
family's post-head transform at a size that matters (soft-caps and scales below).
"""

from __future__ import annotations

import transformers

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    tie_word_embeddings=False,  # the lm_head is rescaled without touching the embeddings
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
WINDOW = 4
MIXED = ["sliding_attention", "full_attention"]


def _spec(cls_name: str, **kwargs):
    return (cls_name, kwargs)


# name -> (config class, overrides); names are the test ids
SPECS = {
    "llama": _spec("LlamaConfig"),
    "qwen2": _spec(
        "Qwen2Config", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "qwen3": _spec("Qwen3Config"),
    "qwen3_sliding": _spec(
        "Qwen3Config", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "mistral": _spec("MistralConfig", sliding_window=WINDOW),
    "phi3": _spec("Phi3Config"),
    "phi3_sliding": _spec("Phi3Config", sliding_window=WINDOW),
    # attention soft-cap small enough to bite on random weights; final cap 30 (default)
    "gemma2": _spec(
        "Gemma2Config",
        sliding_window=WINDOW,
        layer_types=MIXED,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=30.0,
    ),
    "gemma3": _spec(
        "Gemma3TextConfig", sliding_window=WINDOW, layer_types=MIXED, final_logit_softcapping=8.0
    ),
    "olmo2": _spec("Olmo2Config"),
    "olmo3": _spec("Olmo3Config", sliding_window=WINDOW, layer_types=MIXED),
    "granite": _spec("GraniteConfig", logits_scaling=8.0),
    "cohere": _spec("CohereConfig", logit_scale=0.25),
    "cohere2": _spec("Cohere2Config", sliding_window=WINDOW, layer_types=MIXED, logit_scale=0.25),
    "gemma": _spec("GemmaConfig"),
    # StableLM's layers pass no keyword arguments down to attention
    "stablelm": _spec("StableLmConfig"),
    # attention sinks, sliding layers, mixture of experts
    "gpt_oss": _spec(
        "GptOssConfig",
        sliding_window=WINDOW,
        layer_types=MIXED,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),  # fmt: skip
}


def available() -> list[str]:
    """The names whose config class the installed transformers has."""
    return [name for name, (cls, _) in SPECS.items() if hasattr(transformers, cls)]


def make_config(name: str, **overrides):
    cls_name, kwargs = SPECS[name]
    return getattr(transformers, cls_name)(**{**COMMON, **kwargs, **overrides})


def layer_windows(config) -> list[int | None]:
    """The sliding window of every layer as the config declares it (None: full)."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return [None] * n
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * n
    return [window if t == "sliding_attention" else None for t in types]
