"""fastrlhf.rollout: rollout generation with a reusable KV cache, and the hybrid
generate -> score -> train memory state machine.

- ``generate(model, prompt_ids, prompt_cu_seqlens, GenerationConfig(...))`` samples one
  response per packed prompt with the policy's own weights and returns a packed ``Rollout``
  (sampled-token log-probs included); ``Rollout.to_training_batch()`` gives the shifted
  labels / loss mask / old log-probs layout the trainer consumes.
- ``sequence_keys(seed, step, ids)`` gives per-sequence sampling keys; passed to
  ``generate(..., sample_keys=keys)`` they make each rollout a function of its own prompt
  and key only, whatever the batch or rank (layout-invariant data-parallel sampling).
- ``ReusableKVCache`` keeps one static KV cache alive across decode steps and rollouts,
  with the compiled decode step's state and CUDA graphs (``rollout.decode``).
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
from fastrlhf.rollout.sampling import (
    keyed_uniform,
    sample_next_token,
    sequence_keys,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "GenerationConfig",
    "HybridMemoryManager",
    "Phase",
    "PhaseRecord",
    "ReusableKVCache",
    "Rollout",
    "RolloutBatch",
    "generate",
    "keyed_uniform",
    "pack_prompts",
    "sample_next_token",
    "sequence_keys",
    "top_k_filter",
    "top_p_filter",
]
