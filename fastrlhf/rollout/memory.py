"""Hybrid generation/training memory: an explicit state machine over one PPO step's phases.

One PPO step goes generate -> score -> train, and each phase needs different things
resident on the accelerator:

    phase      needs on device                          what the manager does on entry
    generate   policy weights + KV cache                grads -> None (zero_grad(set_to_none));
                                                        optimizer states -> host (optional)
    score      policy / reference / reward / critic     KV cache released (optional, default on)
               forwards, one at a time
    train      policy (+ critic), activations, grads;   error if the KV cache is alive while it
               optimizer states only for the step       should have been released

``use(name)`` brings an offloaded model (critic, reward, reference) to its device for a
``with`` block and sends it back afterwards, so at most the models in use are resident.
``prepare_optimizer_step()`` brings offloaded optimizer states back right before
``optimizer.step()``: forward/backward peak memory then never includes Adam's 2x params.

Offload means: every tensor (parameters, buffers, optimizer state, gradients) is copied into
a host buffer and the tensor is re-pointed to it (``.data`` swap: the nn.Parameter objects,
and so the optimizer's references to them, stay the same). The host buffers are allocated
once and reused, pinned when the tensor lives on CUDA, so a return trip is an async DMA at
full PCIe bandwidth instead of a pageable copy. On a CPU-only machine the same code runs: the
"offload" is a copy into separate host buffers, which saves nothing but keeps the CPU tests
on the exact path the GPU takes (the trainer normally leaves offload off on CPU).

Memory log: each phase gets a ``PhaseRecord``. On CUDA ``peak_bytes`` is
``torch.cuda.max_memory_allocated`` with the peak reset at phase entry; on CPU there is no
resettable peak, so ``peak_bytes`` is None and ``rss_delta_bytes`` is the resident-set size
at phase exit minus at entry (Linux /proc/self/statm; None elsewhere).
"""

from __future__ import annotations

import contextlib
import enum
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from fastrlhf.rollout.cache import ReusableKVCache


class Phase(str, enum.Enum):
    IDLE = "idle"
    GENERATE = "generate"
    SCORE = "score"
    TRAIN = "train"


# The only legal transitions; anything else is a bug in the caller's step loop.
_NEXT: dict[Phase, tuple[Phase, ...]] = {
    Phase.IDLE: (Phase.GENERATE,),
    Phase.GENERATE: (Phase.SCORE,),
    Phase.SCORE: (Phase.TRAIN,),
    Phase.TRAIN: (Phase.GENERATE, Phase.IDLE),
}


@dataclass
class PhaseRecord:
    step: int
    phase: str
    peak_bytes: int | None  # CUDA: peak allocated during the phase; None on CPU
    rss_delta_bytes: int | None  # CPU: RSS at exit - RSS at entry; None on CUDA / non-Linux
    seconds: float


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _HostMirror:
    """Persistent host buffers for a set of tensors, keyed by a caller-chosen key.

    ``offload(key, t)`` copies ``t`` into its host buffer (allocated on first use, pinned if
    ``t`` is on CUDA) and returns the buffer; ``restore(buf, device)`` returns a fresh device
    tensor with the same values. Copies are non-blocking; ``sync`` waits for them.
    """

    def __init__(self) -> None:
        self._host: dict[object, torch.Tensor] = {}

    def offload(self, key: object, t: torch.Tensor) -> torch.Tensor:
        host = self._host.get(key)
        if host is None or host.shape != t.shape or host.dtype != t.dtype:
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            self._host[key] = host
        if host.data_ptr() != t.data_ptr():
            host.copy_(t, non_blocking=True)
        return host

    @staticmethod
    def restore(host: torch.Tensor, device: torch.device) -> torch.Tensor:
        # Always a new tensor, even on CPU: the host buffer must stay a separate copy.
        return torch.empty(host.shape, dtype=host.dtype, device=device).copy_(
            host, non_blocking=True
        )

    @staticmethod
    def sync(device: torch.device) -> None:
        # A non-blocking device->host copy is only safe to read (or to overwrite the source
        # of) once the stream has reached it.
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()


class _ModuleOffloader:
    """Moves one module's parameters, buffers and grads between its device and host."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.mirror = _HostMirror()
        self.device: torch.device | None = None
        self.offloaded = False

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.module.named_parameters(remove_duplicate=True)
        yield from self.module.named_buffers(remove_duplicate=True)

    def offload(self) -> None:
        if self.offloaded:
            return
        for name, t in self._tensors():
            if self.device is None:
                self.device = t.device
            t.data = self.mirror.offload(name, t.data)
            if isinstance(t, torch.nn.Parameter) and t.grad is not None:
                t.grad = t.grad.to("cpu")
        self.mirror.sync(self.device or torch.device("cpu"))
        self.offloaded = True

    def restore(self) -> None:
        if not self.offloaded:
            return
        for _, t in self._tensors():
            t.data = self.mirror.restore(t.data, self.device)
            if isinstance(t, torch.nn.Parameter) and t.grad is not None:
                t.grad = t.grad.to(self.device)
        self.offloaded = False


class _OptimizerOffloader:
    """Moves an optimizer's per-parameter state tensors between device and host.

    Scalar CPU tensors (Adam's ``step`` when not fused/capturable) are left alone.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.mirror = _HostMirror()
        self.devices: dict[tuple[int, str], torch.device] = {}
        self.offloaded = False

    def _items(self) -> Iterator[tuple[tuple[int, str], dict, str, torch.Tensor]]:
        for param, state in self.optimizer.state.items():
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and not (v.device.type == "cpu" and v.dim() == 0):
                    yield (id(param), k), state, k, v

    def offload(self) -> None:
        if self.offloaded:
            return
        devices = set()
        for key, state, k, v in self._items():
            self.devices[key] = v.device
            devices.add(v.device)
            state[k] = self.mirror.offload(key, v)
        for d in devices:
            self.mirror.sync(d)
        self.offloaded = True

    def restore(self) -> None:
        if not self.offloaded:
            return
        for key, state, k, v in self._items():
            state[k] = self.mirror.restore(v, self.devices[key])
        self.offloaded = False


class HybridMemoryManager:
    """The generate -> score -> train state machine for one trainer (see module docstring).

    Args:
        policy: the trained policy (its grads are dropped before generation).
        optimizers: optimizers whose state may be offloaded during generate/score.
        models: auxiliary models by name ("critic", "reward", "reference", ...).
        offload_optimizer: move optimizer states to host for generate and score.
        offload_models: names in ``models`` kept on host except inside ``use(name)``.
        release_kv_cache: drop the KV cache when generation ends (default); False keeps it
            allocated across steps (no reallocation, but its memory is held during training).
        kv_cache: the cache ``generate`` uses (created if None).
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        models: Mapping[str, torch.nn.Module] | None = None,
        *,
        offload_optimizer: bool = False,
        offload_models: Iterable[str] = (),
        release_kv_cache: bool = True,
        kv_cache: ReusableKVCache | None = None,
    ) -> None:
        self.policy = policy
        self.models = dict(models or {})
        self.optimizers = list(optimizers)
        unknown = sorted(set(offload_models) - set(self.models))
        if unknown:
            raise ValueError(
                f"offload_models names {unknown}, which are not in models ({sorted(self.models)})"
            )
        self.release_kv_cache = release_kv_cache
        self.kv_cache = kv_cache if kv_cache is not None else ReusableKVCache()
        self._model_offload = {n: _ModuleOffloader(self.models[n]) for n in offload_models}
        self._optim_offload = (
            [_OptimizerOffloader(o) for o in self.optimizers] if offload_optimizer else []
        )
        self.device = next(policy.parameters()).device
        self.phase = Phase.IDLE
        self.step = 0
        self.records: list[PhaseRecord] = []
        self._phase_start: tuple[float, int | None] | None = None
        self._in_use: set[str] = set()

    # ---------------------------------------------------------------- transitions
    def enter(self, phase: Phase | str) -> None:
        """Move to ``phase`` (generate -> score -> train -> generate ...), doing its set-up."""
        phase = Phase(phase)
        if phase not in _NEXT[self.phase]:
            allowed = ", ".join(p.value for p in _NEXT[self.phase])
            raise RuntimeError(
                f"cannot enter phase '{phase.value}' from '{self.phase.value}'; "
                f"allowed next: {allowed}"
            )
        if self._in_use:
            raise RuntimeError(
                f"cannot leave phase '{self.phase.value}' while models {sorted(self._in_use)} "
                "are inside use(); exit those blocks first"
            )
        if phase is Phase.TRAIN and self.release_kv_cache and self.kv_cache.alive:
            raise RuntimeError(
                f"entering 'train' while the KV cache is alive ({self.kv_cache.nbytes()} bytes): "
                "something generated after the generate phase; release it first"
            )
        self._close_record()
        if phase is Phase.GENERATE:
            self.step += 1
            self._drop_grads()
            for off in self._optim_offload:
                off.offload()
            for off in self._model_offload.values():
                off.offload()
        elif phase is Phase.SCORE and self.release_kv_cache:
            self.kv_cache.release()
        self.phase = phase
        if phase is not Phase.IDLE:
            self._open_record()

    def generate(self) -> None:
        self.enter(Phase.GENERATE)

    def score(self) -> None:
        self.enter(Phase.SCORE)

    def train(self) -> None:
        self.enter(Phase.TRAIN)

    def finish(self) -> None:
        """End the last phase (closing its record); the next step starts with ``generate``."""
        self.enter(Phase.IDLE)

    def prepare_optimizer_step(self) -> None:
        """Bring offloaded optimizer states back; call right before ``optimizer.step()``."""
        if self.phase is not Phase.TRAIN:
            raise RuntimeError(
                f"prepare_optimizer_step() belongs to the 'train' phase, not '{self.phase.value}'"
            )
        for off in self._optim_offload:
            off.restore()

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[torch.nn.Module]:
        """The model ``name`` on its device for the block; back to host after, if offloaded."""
        if name not in self.models:
            raise KeyError(f"no model named {name!r}; models: {sorted(self.models)}")
        if name in self._in_use:
            raise RuntimeError(f"model {name!r} is already inside use()")
        off = self._model_offload.get(name)
        if off is not None:
            off.restore()
        self._in_use.add(name)
        try:
            yield self.models[name]
        finally:
            self._in_use.discard(name)
            if off is not None:
                off.offload()

    def is_offloaded(self, name: str) -> bool:
        off = self._model_offload.get(name)
        return off is not None and off.offloaded

    @property
    def optimizer_offloaded(self) -> bool:
        return any(off.offloaded for off in self._optim_offload)

    # ---------------------------------------------------------------- logging
    def summary(self, step: int | None = None) -> dict[str, float | int | None]:
        """``{"memory/<phase>_peak_bytes" | "memory/<phase>_rss_delta_bytes": v}`` for a step."""
        step = self.step if step is None else step
        out: dict[str, float | int | None] = {}
        for r in self.records:
            if r.step == step:
                out[f"memory/{r.phase}_peak_bytes"] = r.peak_bytes
                out[f"memory/{r.phase}_rss_delta_bytes"] = r.rss_delta_bytes
                out[f"time/{r.phase}_s"] = r.seconds
        return out

    # ---------------------------------------------------------------- internals
    def _drop_grads(self) -> None:
        self.policy.zero_grad(set_to_none=True)
        for m in self.models.values():
            m.zero_grad(set_to_none=True)
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def _open_record(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._phase_start = (time.perf_counter(), None)
        else:
            self._phase_start = (time.perf_counter(), _rss_bytes())

    def _close_record(self) -> None:
        if self._phase_start is None:
            return
        t0, rss0 = self._phase_start
        peak = rss_delta = None
        if self.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            rss1 = _rss_bytes()
            rss_delta = None if rss0 is None or rss1 is None else rss1 - rss0
        self.records.append(
            PhaseRecord(self.step, self.phase.value, peak, rss_delta, time.perf_counter() - t0)
        )
        self._phase_start = None
