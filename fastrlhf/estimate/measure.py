"""Measuring one piece of work without a GPU: PyTorch's ``MemTracker`` for peak bytes by
category, an ATen op counter for launches, and the attention kernels a GPU would pick.

Why fake CPU tensors and not bare meta tensors: autocast only acts on tensors of its own
device type (``torch.autocast("cuda")`` leaves a meta tensor in float32), and the trainer's
default is float32 master weights with a bf16 autocast region. Models are built on the
meta device (no memory, no init) and then materialised as *fake* CPU tensors
(``FakeTensorMode``: shapes and dtypes only), under which CPU autocast casts exactly like
CUDA autocast for the ops that matter here (linear / matmul / bmm to bf16, cached weight
casts). The same code runs on real CPU tensors for validation (``fake=False``).

Attention: on meta/fake tensors SDPA falls back to the math path and would count
[B, H, T, T] scores that no GPU kernel stores. ``ESTIMATE_ATTENTION`` is registered with
transformers for packed (training / scoring) forwards and follows the branches our packed
attention takes on CUDA, calling the flash kernel on the whole row (memory: the output
plus an fp32 log-sum-exp per sequence, whatever the split); ``PinnedSDPA`` routes the
masked SDPA of padded generation to the memory-efficient kernel (what CUDA runs for a
boolean mask).

Legend: B = batch, Hq/Hkv = query/key-value heads, T = tokens, D = head dim.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ESTIMATE_ATTENTION = "fastrlhf_estimate"

# ATen ops that launch no GPU kernel: views, metadata, allocation-only factories, host
# queries. Everything else counts as at least one launch (foreach ops and split-K GEMMs
# launch more, so the count is a lower bound).
NO_KERNEL = frozenset(
    f"aten.{name}"
    for name in (
        "view _unsafe_view reshape expand t transpose permute unsqueeze squeeze slice select "
        "as_strided alias detach detach_ _reshape_alias split split_with_sizes unbind chunk "
        "narrow diagonal unflatten view_as expand_as lift_fresh empty empty_like new_empty "
        "new_empty_strided empty_strided sym_size sym_stride sym_numel sym_storage_offset "
        "is_same_size set_ resize_ _local_scalar_dense is_nonzero unsafe_split movedim "
        "_has_compatible_shallow_copy_type"
    ).split()
) | {"prim.device", "prim.layout"}

CATEGORIES = ("parameters", "buffers", "gradients", "optimizer", "activations", "temporaries")
_TRACKER_NAMES = {
    "Parameter": "parameters",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "other",
}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops that reach dispatch (after autograd and decompositions).

    With a ``tracker``, a custom op whose GPU launcher allocates scratch (``scratch``)
    also records the moment's total: tracked bytes now + the launcher's peak."""

    def __init__(self, tracker=None) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.tracker = tracker
        self.op_peak = 0  # highest "bytes live + launcher peak" seen at a custom op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] += 1
        if self.tracker is not None and name.startswith("fastrlhf."):
            from fastrlhf.estimate.scratch import launcher_peak

            extra = launcher_peak(name, tuple(args))
            if extra:
                now = self.tracker.get_tracker_snapshot("current")
                live = max((d.get("Total", 0) for d in now.values()), default=0)
                self.op_peak = max(self.op_peak, live + extra)
        return func(*args, **(kwargs or {}))

    def kernels(self) -> int:
        """Ops that launch at least one GPU kernel."""
        return sum(v for k, v in self.counts.items() if k not in NO_KERNEL)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None):
    """Causal flash attention [B, Hq, T, D] -> [B, Hq, T, D]; GQA without expanding K/V."""
    if isinstance(q, torch._subclasses.fake_tensor.FakeTensor) or q.device.type == "meta":
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=scale
        )
    else:  # real CPU tensors (validation runs): the CPU flash kernel, same saved tensors
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, True, scale=scale
        )
    return out[0]


# Whether flash-attn is installed on the GPU (the ``flash`` extra): set by ``estimate``.
FLASH_ATTN = {"installed": False}


def estimate_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """transformers attention function for packed rows, following the CUDA branches of
    ``fastrlhf.models.attention.varlen_attention_forward`` -> ([B, T, Hq, D], None):

    - bf16/fp16 queries and flash-attn installed: flash-attn varlen, K/V not expanded;
    - otherwise ``sdpa_per_sequence``: K/V heads repeated for GQA, SDPA (whose autocast
      casts float32 inputs to bf16) on the flash kernel, one output per sequence and a
      ``cat``. With float32 master weights RoPE makes Q and K float32, so this is the
      path the trainer's default (``model.dtype: auto`` + autocast) takes.
    """
    from fastrlhf.models.attention_paths import _expand_kv

    half = (torch.float16, torch.bfloat16)
    if query.dtype in half and FLASH_ATTN["installed"]:
        return _flash(query, key, value, scaling).transpose(1, 2), None
    key, value = _expand_kv(query, key, value)
    if torch.is_autocast_enabled("cpu"):  # stands for CUDA autocast (see the module doc)
        dt = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dt) for t in (query, key, value))
    elif len({query.dtype, key.dtype, value.dtype}) > 1:
        query, key, value = (t.to(value.dtype) for t in (query, key, value))
    out = _flash(query, key, value, scaling)
    return torch.cat([out], dim=2).transpose(1, 2), None


def register_estimate_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ESTIMATE_ATTENTION, estimate_attention_forward)
    return ESTIMATE_ATTENTION


class PinnedSDPA(TorchFunctionMode):
    """Masked SDPA (padded generation) -> the memory-efficient kernel's footprint: the
    output only, no [B, H, Tq, Tk] scores (the boolean mask itself is the caller's)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        a = dict(zip(names, args), **kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        if k.shape[1] != q.shape[1]:  # the efficient kernel takes no GQA: expand as HF does
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if isinstance(q, torch._subclasses.fake_tensor.FakeTensor) or q.device.type == "meta":
            out = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, False, scale=a.get("scale")
            )
        else:
            out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, scale=a.get("scale")
            )
        return out[0]


@dataclass
class Measurement:
    """Peak bytes of one measured piece of work, by category, and its ATen op counts."""

    peak_bytes: int
    by_category: dict[str, int]  # at the moment of the peak
    kernels: int = 0  # ATen ops that launch >= 1 kernel
    extra_bytes: dict[str, int] = field(default_factory=dict)  # added outside the tracker

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + sum(self.extra_bytes.values())


class Tracked:
    """Handle of a ``tracked`` block: ``counter`` counts its ops as they run,
    ``result()`` (after the block) is its Measurement."""

    def __init__(self, mt, counter: OpCounter) -> None:
        self.mt, self.counter = mt, counter

    def result(self) -> Measurement:
        return _measurement(self.mt, self.counter)


@contextlib.contextmanager
def tracked(*external) -> Iterator[Tracked]:
    """``with tracked(model, optimizer, tensor, ...) as t:`` measure the block.

    ``external`` are the objects alive before the block (modules, optimizers, tensors):
    the tracker counts them from the start.
    """
    mt = _tracker_class()()
    mt.track_external(*external)
    counter = OpCounter(mt)
    with mt, counter:
        yield Tracked(mt, counter)


def _tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        """MemTracker that accepts a model called again (decode steps, micro-batches):
        its per-module stats restart, the device totals and the peak go on."""

        def _pre_fw_hook(self, module, inputs) -> None:
            try:
                super()._pre_fw_hook(module, inputs)
            except NotImplementedError:
                self.reset_mod_stats()
                super()._pre_fw_hook(module, inputs)

        def _update_peak_stats(self, peak_state) -> None:
            # device totals only: the per-module peaks (a loop over every module at every
            # op, most of the tracker's cost) are never read here
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # a gradient hook cannot be registered on a frozen parameter (reference and
            # reward models): hook only modules whose parameters all train
            hooks = install_grad_hooks and all(p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, hooks)

    return Tracker


def _measurement(mt, counter: OpCounter) -> Measurement:
    peak = mt.get_tracker_snapshot("peak")
    best = max(peak.values(), key=lambda d: d.get("Total", 0)) if peak else {}
    cats = {name: 0 for name in (*CATEGORIES, "other")}
    for key, value in best.items():
        name = getattr(key, "value", key)
        if name != "Total":
            cats[_TRACKER_NAMES.get(name, "other")] += int(value)
    total = int(best.get("Total", 0))
    # the custom ops' scratch, when the moment inside one beats the tracker's own peak
    extra = {"op_scratch": counter.op_peak - total} if counter.op_peak > total else {}
    return Measurement(total, cats, counter.kernels(), extra)
