"""A KV cache allocated once and reused across decode steps and across rollouts.

Shapes: B = sequences in the rollout batch, S = cache capacity in tokens (prompt + response).

The cache is a transformers ``StaticCache``: per layer, K and V buffers of shape
[B, kv_heads, S, head_dim] that the attention layers write in place
(``index_copy_``). It is created the first time a rollout of batch size B needs at most
S tokens, and every later rollout with the same B and a length that fits just calls
``reset()`` (zero the buffers and the length counter) – no allocation, the same
``data_ptr`` s, and on CUDA no fragmentation of the caching allocator between steps.

Capacity is rounded up to a multiple of ``CAPACITY_GRANULE`` tokens so that rollouts whose
longest prompt differs by a few tokens still reuse the buffers; a longer request or another
batch size drops the old cache before allocating the new one (peak memory never holds
both). ``release()`` drops the buffers so the memory goes back to the allocator for the
training forward (see ``fastrlhf.rollout.memory``).

The decode step's static state (``decode.DecodeState``) and its CUDA graphs were built
against these buffers, so the cache owns them: they are kept while the cache is reused
and dropped with it (``release()``, or a reallocation). See ``fastrlhf.rollout.decode``
for that policy between generation and training.

Cost: a static cache attends over all S positions at every step (masked ones included);
for S well above the real length that is wasted work, which the granule keeps small.
"""

from __future__ import annotations

import torch

from fastrlhf.rollout.decode import DecodeState

CAPACITY_GRANULE = 64


def _round_up(n: int, granule: int) -> int:
    return -(-n // granule) * granule


class ReusableKVCache:
    """Owner of one ``transformers.StaticCache``, reused while (batch, capacity) fit.

    ``acquire(config, batch_size, length)`` returns a reset cache able to hold ``length``
    tokens per row; ``release()`` frees it; ``allocations`` counts how many caches were
    ever created (tests and logs use it to confirm reuse).
    """

    def __init__(self, granule: int = CAPACITY_GRANULE) -> None:
        if granule < 1:
            raise ValueError(f"granule must be >= 1, got {granule}")
        self.granule = granule
        self._cache = None
        self._batch_size = 0
        self._capacity = 0
        self._config = None
        self.allocations = 0
        self._state: DecodeState | None = None
        # CUDA graphs of the compiled decode step, by its StepSpec (decode.StepRunner)
        self.graphs: dict = {}

    @property
    def alive(self) -> bool:
        """True while the cache holds (or is about to hold, on first use) device buffers."""
        return self._cache is not None

    @property
    def capacity(self) -> int:
        return self._capacity if self.alive else 0

    def acquire(
        self,
        config,
        batch_size: int,
        length: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        """A reset ``StaticCache`` for ``batch_size`` rows of at most ``length`` tokens.

        ``config`` is the HF model config (it says which layers need a cache). When
        ``device``/``dtype`` are given and the existing buffers differ (the model moved or
        was cast), the cache is reallocated instead of failing inside the model.
        """
        if batch_size < 1 or length < 1:
            raise ValueError(
                f"batch_size and length must be >= 1, got batch_size={batch_size}, length={length}"
            )
        bufs = self.buffers()
        fits = (
            self._cache is not None
            and self._batch_size == batch_size
            and self._capacity >= length
            and self._config is config
            and all(device is None or b.device == torch.device(device) for b in bufs)
            and all(dtype is None or b.dtype == dtype for b in bufs)
        )
        if fits:
            # zeroes K/V and the per-layer length counters in place: same buffers
            self._cache.reset()
            return self._cache
        self.release()  # drop the old buffers before allocating the new ones
        from transformers import StaticCache  # transformers is heavy: import on first use

        self._capacity = _round_up(length, self.granule)
        self._batch_size = batch_size
        self._config = config
        # Buffers are allocated lazily by the first attention forward (which knows the
        # dtype, device, kv-head count and head dim) and then kept.
        self._cache = StaticCache(config=config, max_cache_len=self._capacity)
        self.allocations += 1
        return self._cache

    def decode_state(self, device: torch.device) -> DecodeState:
        """The decode step's buffers for this cache's (batch, capacity), made on first use."""
        if self._cache is None:
            raise RuntimeError("decode_state() needs a cache: call acquire() first")
        st = self._state
        if st is None or st.token.device != torch.device(device):
            self.graphs.clear()  # captured against the old buffers
            st = self._state = DecodeState(self._batch_size, self._capacity, device)
        return st

    def buffers(self) -> list[torch.Tensor]:
        """The K and V buffers of every layer (empty before the first forward)."""
        if self._cache is None:
            return []
        out = []
        for layer in self._cache.layers:
            if getattr(layer, "is_initialized", False):
                out.extend([layer.keys, layer.values])
        return out

    def nbytes(self) -> int:
        """Bytes of the K/V buffers."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def held_bytes(self) -> int:
        """Everything this object keeps allocated: K/V, the decode state, the graph pools."""
        state = 0 if self._state is None else self._state.nbytes()
        return self.nbytes() + state + sum(g.pool_bytes for g in self.graphs.values())

    def release(self) -> None:
        """Drop the buffers, the decode state and its graphs; the next ``acquire``
        allocates afresh (and the next compiled rollout captures again)."""
        self.graphs.clear()  # graphs first: their pools hold addresses of the buffers
        self._state = None
        self._cache = None
        self._batch_size = 0
        self._capacity = 0
        self._config = None
