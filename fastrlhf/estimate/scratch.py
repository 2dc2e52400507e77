"""Internal scratch of the custom ops, which the tracker sees as one op (outputs only).

The GPU path of ``linear_token_logprobs`` allocates inside its launcher: the forward's
[4, splits, N] float32 partials, the backward's float32 dH accumulator, an [N, Vb]
dlogits block in the model dtype and a float32 [N, H] product per block. Rather than
copying those sizes into formulas that would go stale, ``launcher_peak`` runs the op's
own launcher code (``fastrlhf.ops.linear_logprobs._forward`` / ``_backward`` with
``use_triton=True``) on meta tensors under the tracker, with the two Triton launches
stubbed out and the matmul helpers replaced by what cuBLAS allocates on a GPU (a float32
[M, N] result; ``out=`` writes nothing new). The vocabulary split count uses the CUDA
formula at ``SMS`` streaming multiprocessors (H100 / H200: 132).

The loss ops (``ppo_policy_loss``, ``value_loss``, ``kl_penalty``) keep O(sequences)
partials: below a kilobyte per sequence, not modelled.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from unittest import mock

import torch

SMS = 132
FWD_OP = "fastrlhf.linear_token_logprobs"
BWD_OP = "fastrlhf.linear_token_logprobs_bwd"


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _mm_f32_gpu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.promote_types(a.dtype, torch.float32))


@contextlib.contextmanager
def _gpu_launcher() -> Iterator[None]:
    from fastrlhf.kernels import linear_logprobs as k
    from fastrlhf.ops import linear_logprobs as op

    with contextlib.ExitStack() as stack:
        for obj, name, new in (
            (k, "_fwd_kernel", _NoLaunch()),
            (k, "_dlogits_kernel", _NoLaunch()),
            (op, "_mm_f32", _mm_f32_gpu),
            (op, "_mm_into", lambda out, a, b: None),
        ):
            stack.enter_context(mock.patch.object(obj, name, new))
        yield


def _meta(t):
    if isinstance(t, torch.Tensor):
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    return t


def _spec(args) -> tuple:
    def one(a):
        if isinstance(a, torch.Tensor):
            return tuple(a.shape), a.dtype
        return tuple(a) if isinstance(a, list) else a  # the backward's ``needs`` list

    return tuple(one(a) for a in args)


def launcher_peak(op_name: str, args: tuple) -> int:
    """Peak bytes the GPU launcher of ``op_name`` allocates (outputs included) for
    arguments shaped like ``args`` (the op's schema order); 0 for other ops."""
    if op_name not in (FWD_OP, BWD_OP):
        return 0
    return _launcher_peak(op_name, _spec(args))


@functools.lru_cache(maxsize=64)
def _launcher_peak(op_name: str, spec: tuple) -> int:
    def rebuild(s):
        if isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], torch.dtype):
            return torch.empty(s[0], dtype=s[1], device="meta")
        return s

    from torch.utils._python_dispatch import _disable_current_modes

    # called from inside the estimate's dispatch modes: run outside them, on meta tensors
    with _disable_current_modes():
        args = [rebuild(s) for s in spec]
        return _run_launcher(op_name, args)


def _run_launcher(op_name: str, args: list) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    from fastrlhf.ops import linear_logprobs as op

    mt = MemTracker()
    with _gpu_launcher(), mt:
        # the op's schema order: its inputs, then (backward) its outputs, grads and needs
        hidden, weight, labels, bias, temp, ignore, vocab, ret_ent, _impl = args[:9]
        softcap, logit_scale = args[9:11]
        if op_name == FWD_OP:  # ``_op`` with impl="triton"
            from fastrlhf.kernels.linear_logprobs import linear_logprobs_fwd

            # the vocabulary split the launcher sizes for an SMS-SM GPU
            raw, _, _ = linear_logprobs_fwd(
                hidden, weight, labels, bias, 1.0 / temp, vocab, ret_ent, None, softcap,
                logit_scale, sm_count=SMS,
            )  # fmt: skip
            ignored, bad, _ = op.label_masks(labels, ignore, vocab)
            raw.masked_fill(bad, math.nan).masked_fill(ignored, 0.0)
        else:  # ``_op_backward``
            (_, entropy, lse), (g_lp, g_ent, _), needs = args[11:14], args[14:17], args[17]
            g_lp = g_lp if g_lp is not None else torch.zeros_like(lse)
            g_ent = g_ent if ret_ent else None
            op._backward(
                g_lp, g_ent, hidden, weight, labels, bias, lse, entropy, temp, ignore, vocab,
                tuple(needs), True, softcap, logit_scale,
            )  # fmt: skip
    peak = mt.get_tracker_snapshot("peak")
    return max((d.get("Total", 0) for d in peak.values()), default=0)
