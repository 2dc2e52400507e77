"""fastrlhf.rollout: rollout generation with a reusable KV cache, and the hybrid
generate -> score -> train memory state machine.

- ``generate(model, prompt_ids, prompt_cu_seqlens, GenerationConfig(...))`` samples one
  response per packed prompt with the policy's own weights and returns a packed ``Rollout``
  (sampled-token log-probs included); ``Rollout.to_training_batch()`` gives the shifted
  labels / loss mask / old log-probs layout the trainer consumes.
- ``ReusableKVCache`` keeps one static KV cache alive across decode steps and rollouts.
- ``HybridMemoryManager`` enforces the phase order and frees / offloads memory between phases.

transformers is imported only when a cache is first allocated.
"""

from __future__ import annotations

from fastrlhf.rollout.cache import ReusableKVCache
from fastrlhf.rollout.generate import (
    GenerationConfig,
    Rollout,
    RolloutBatch,
    generate,
    pack_prompts,
)
from fastrlhf.rollout.memory import HybridMemoryManager, Phase, PhaseRecord
from fastrlhf.rollout.sampling import sample_next_token, top_k_filter, top_p_filter

__all__ = [
    "GenerationConfig",
    "HybridMemoryManager",
    "Phase",
    "PhaseRecord",
    "ReusableKVCache",
    "Rollout",
    "RolloutBatch",
    "generate",
    "pack_prompts",
    "sample_next_token",
    "top_k_filter",
    "top_p_filter",
]
