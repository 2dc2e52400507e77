"""Which examples an optimizer step trains on, and how they are packed into micro-batches.

The order is a pure function of (seed, step): epochs of seeded permutations, so a resumed
run needs only its step to continue with the same examples.
"""

from __future__ import annotations

import torch


def step_indices(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step`` (0-based): epochs of seeded permutations."""
    out = []
    perms: dict[int, torch.Tensor] = {}
    for q in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(q, num_examples)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(num_examples, generator=g)
        out.append(int(perms[epoch][j]))
    return out


def pack_indices(indices: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Split examples into micro-batches of at most ``max_tokens`` tokens (first-fit
    decreasing, fastrlhf.data.packing); an example longer than the budget gets a
    micro-batch of its own rather than an error."""
    from fastrlhf.data.packing import pack_sequences

    fits = [i for i in indices if lengths[i] <= max_tokens]
    too_long = [[i] for i in indices if lengths[i] > max_tokens]
    bins = pack_sequences([lengths[i] for i in fits], max_tokens, algorithm="ffd")
    return [[fits[j] for j in b] for b in bins] + too_long
