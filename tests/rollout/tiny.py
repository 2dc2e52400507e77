"""Tiny random-init causal LMs for the rollout tests (built in-process, nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 97  # odd, not a power of two


def tiny_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: the cache holds fewer heads than the queries
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_lm(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A random tiny Llama; the init is scaled up so its next-token distributions are peaked
    enough for sampling to differ from uniform (random init at std 0.02 is nearly flat)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(**overrides))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.15)
    return model.to(dtype)


def random_prompts(lengths, seed: int = 1, low: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, VOCAB, (n,), generator=g) for n in lengths]
