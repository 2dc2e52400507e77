"""Triton kernels for ``token_logprobs``: log p(label) and entropy of softmax(logits / T).

Shapes: N = rows (tokens), V = logits' last dim, V' = vocab_size <= V (columns >= V' are
padding of a wide lm_head and are treated as -inf logits, with a zero gradient).

Rows are addressed as a [B, T, V] view, row r at ``(r // T) * stride_outer + (r % T) *
stride_inner``, so a ``logits[:, :-1]`` slice of a [B, T+1, V] tensor is read in place,
never copied. Offsets are int64: N * V may exceed 2^31.

Forward (one program per row, one read of the row): an online logsumexp with a running
row max M (one block max per iteration) and per-lane sums s = sum e^(z-M) and
a = sum e^(z-M)(z-M), summed across lanes once at the end; the rescale on a new max is
one scalar exp per block, so the loop costs one exp per element. z = logits / T, fp32.

    lse = M + log S,    logp = z[label] - lse,    entropy = log S - A / S

Backward (one program per row, one read and one write of the row):

    dz = g * (onehot(label) - p) - g_H * p * (log p + H),   dlogits = dz / T

written into a new buffer or into the logits buffer itself (each element is read and
then written by the same program, so in place is safe).

Post-head transform (HF's order; constexpr SOFTCAP, fp32): x = logits * scale, then
x = cap * tanh(x / cap), then z = x / T. Without a cap the launcher folds the scale into
inv_temp (one multiply, as before); with one the kernels get cap and pre = scale / cap,
and the backward multiplies by d x / d logits = scale * (1 - tanh^2) (tanh_and_sech2).

Masked (-inf) logits: exp(-inf - (-inf)) and 0 * -inf are NaN, so every place that
could form them is guarded; NaN logits are *not* guarded and propagate to the row's
outputs. A label outside [0, V') that is not ignore_index is never loaded; its row gets
NaN (forward value and gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrlhf.kernels import interpreting
from fastrlhf.kernels._launch import device_of

# Autotuned on GPU; under the interpreter the launchers bypass the autotuner (more than
# one config crashes there) and pick one large block, since every program instance and
# every loop iteration costs milliseconds of numpy work.
# Every config compiles without register spills for sm_90 and sm_80 (`make
# kernel-check`); BLOCK_V = 16384 on 16 warps spilled in the entropy forward.
_CONFIGS = [
    triton.Config({"BLOCK_V": bv}, num_warps=w)
    for bv, w in [(2048, 4), (4096, 8), (8192, 8), (8192, 16)]
]
_INTERPRETER_MAX_BLOCK = 1 << 15


def needs_bf16_rounding(t: torch.Tensor) -> bool:
    """The interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even)."""
    return t.dtype == torch.bfloat16 and interpreting()


@triton.jit
def round_to_bf16(x):
    """Round float32 to the nearest-even bfloat16 value, still as float32 (exact to cast).

    Used only under the interpreter (constexpr-gated), whose bf16 cast truncates.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def tanh_and_sech2(y):
    """(tanh y, 1 - tanh^2 y) in fp32 (tl has no tanh that the interpreter runs as well).

    With t = e^(-2|y|): tanh = (1 - t) / (1 + t), which never overflows and is exactly
    +-1 at +-inf (NaN stays NaN), and 1 - tanh^2 = 4t / (1 + t)^2 with no cancellation:
    1 - th * th is 0 once th rounds to 1 (|y| > 9), where the true slope is not. Below
    |y| = 0.25, where 1 - t cancels to a few ulp, tanh is the odd Taylor series to y^9
    (truncation < 1e-7 relative there)."""
    t = tl.exp(-2.0 * tl.abs(y))
    inv = 1.0 / (1.0 + t)
    r = (1.0 - t) * inv
    r = tl.where(y < 0, -r, r)
    y2 = y * y
    series = y * (1.0 + y2 * (-1.0 / 3 + y2 * (2.0 / 15 + y2 * (-17.0 / 315 + y2 * (62.0 / 2835)))))
    return tl.where(tl.abs(y) < 0.25, series, r), 4.0 * t * inv * inv


@triton.jit
def tanh_f32(y):
    th, _ = tanh_and_sech2(y)
    return th


def head_args(inv_temp: float, softcap: float | None, logit_scale: float):
    """(inv_temp, cap, pre, SOFTCAP) for the kernels: without a cap the scale joins inv_temp."""
    if softcap is None:
        return inv_temp * logit_scale, 1.0, 1.0, False
    return inv_temp, float(softcap), logit_scale / softcap, True


@triton.autotune(configs=_CONFIGS, key=["V_total", "HAS_ENTROPY"])
@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    T_inner,
    stride_outer,
    stride_inner,
    V,  # columns that count (vocab_size)
    V_total,  # logits' last dim (autotune key only: the forward never reads past V)
    inv_temp,
    ignore_index,
    cap,
    pre,
    HAS_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // T_inner) * stride_outer + (row % T_inner) * stride_inner
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    m = tl.full([], neg_inf, tl.float32)  # running row max
    s = tl.zeros([BLOCK_V], tl.float32)  # per lane: sum e^(z - m)
    a = tl.zeros([BLOCK_V], tl.float32)  # per lane: sum e^(z - m) (z - m)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        z = tl.load(base + idx, mask=idx < V, other=neg_inf).to(tl.float32)
        if SOFTCAP:  # columns >= V stay -inf (tanh would make them -cap)
            z = tl.where(idx < V, cap * tanh_f32(z * pre), neg_inf)
        z = z * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While the row has seen only -inf, m_new = -inf and z - m_new would be NaN:
        # shift by 0 instead (every e is then exp(-inf) = 0). The rescale of the
        # accumulators is one scalar exp per block, so the loop costs one exp per element.
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        if HAS_ENTROPY:
            # Moving the reference max from m to m_new shifts every (z - m) term by
            # (m - m_new); -inf logits contribute 0, not 0 * -inf.
            delta = tl.where(m == neg_inf, 0.0, m - m_safe)
            a = alpha * (a + delta * s) + e * tl.where(z == neg_inf, 0.0, z - m_safe)
        s = s * alpha + e
        m = m_new
    total = tl.sum(s, axis=0)
    lse = m + tl.log(total)
    tl.store(lse_ptr + row, lse)

    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = (label >= 0) & (label < V)
    x = tl.load(base + label, mask=valid, other=0.0).to(tl.float32)
    if SOFTCAP:
        x = cap * tanh_f32(x * pre)
    x = x * inv_temp
    logp = tl.where(valid, x - lse, float("nan"))
    logp = tl.where(label == ignore_index, 0.0, logp)
    tl.store(logp_ptr + row, logp)

    if HAS_ENTROPY:
        acc = tl.sum(a, axis=0)  # sum_j e^(z_j - M) (z_j - M)
        tl.store(entropy_ptr + row, tl.log(total) - acc / total)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,
    dlogits_ptr,
    labels_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    T_inner,
    stride_outer,
    stride_inner,
    d_stride_outer,
    d_stride_inner,
    V,
    V_total,
    inv_temp,
    ignore_index,
    cap,
    pre,
    HAS_ENTROPY_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // T_inner
    inner = row % T_inner
    base = logits_ptr + outer * stride_outer + inner * stride_inner
    dbase = dlogits_ptr + outer * d_stride_outer + inner * d_stride_inner
    cols = tl.arange(0, BLOCK_V)

    lse = tl.load(lse_ptr + row)
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    valid = (label >= 0) & (label < V)
    g = tl.load(grad_logp_ptr + row).to(tl.float32)
    # ignored: logp is the constant 0; bad label: its NaN reaches the whole row's gradient.
    g = tl.where(ignored, 0.0, tl.where(valid, g, float("nan")))
    if HAS_ENTROPY_GRAD:
        g_h = tl.load(grad_entropy_ptr + row).to(tl.float32)
        h = tl.load(entropy_ptr + row)
    for start in range(0, V_total, BLOCK_V):
        idx = start + cols
        z = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        if SOFTCAP:
            th, sech2 = tanh_and_sech2(z * pre)
            z = tl.where(idx < V, cap * th, float("-inf"))
        z = z * inv_temp
        log_p = z - lse
        p = tl.exp(log_p)
        d = g * (tl.where(idx == label, 1.0, 0.0) - p)
        if HAS_ENTROPY_GRAD:
            # p == 0 (a -inf logit) contributes 0, not 0 * -inf.
            d -= g_h * tl.where(p > 0, p * (log_p + h), 0.0)
        d = d * inv_temp
        if SOFTCAP:  # d x / d logits = scale * (1 - tanh^2), scale = cap * pre
            d = d * ((cap * pre) * sech2)
        if ROUND_BF16:
            d = round_to_bf16(d)
        tl.store(dbase + idx, d.to(dlogits_ptr.dtype.element_ty), mask=idx < V_total)


_BWD_KEY = ["V_total", "HAS_ENTROPY_GRAD"]
_bwd_autotuned = triton.autotune(configs=_CONFIGS, key=_BWD_KEY)(_token_logprobs_bwd_kernel)
# The in-place backward is not autotuned: every trial would overwrite the logits the next
# one reads, and restoring them clones [N, V] per trial (GBs, the memory in place saves).
# It takes the config the out-of-place backward or the forward chose for the same
# vocabulary and dtype (the forward always runs first), else a fixed one.
_chosen: dict[tuple, triton.Config] = {}
_INPLACE_DEFAULT = triton.Config({"BLOCK_V": 8192}, num_warps=8)


def _inplace_config(v_total: int, has_h: bool, dtype: torch.dtype) -> triton.Config:
    return _chosen.get(("bwd", v_total, has_h, dtype)) or _chosen.get(
        ("fwd", v_total, dtype), _INPLACE_DEFAULT
    )


def _block(v: int) -> int:
    return min(triton.next_power_of_2(max(v, 16)), _INTERPRETER_MAX_BLOCK)


def token_logprobs_fwd(
    logits: torch.Tensor,
    layout: tuple[int, int, int],
    labels: torch.Tensor,
    inv_temp: float,
    ignore_index: int,
    vocab_size: int,
    return_entropy: bool,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. ``layout`` = (T_inner, stride_outer, stride_inner) of the rows.

    Returns (logp [N], lse [N], entropy [N] or [0]), all float32.
    """
    n = labels.numel()
    v_total = logits.shape[-1]
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(n if return_entropy else 0, dtype=torch.float32, device=logits.device)
    if n == 0:
        return logp, lse, entropy
    t_inner, s_outer, s_inner = layout
    args = (logits, labels, logp, lse, entropy, t_inner, s_outer, s_inner, vocab_size, v_total)
    inv_temp, cap, pre, has_cap = head_args(inv_temp, softcap, logit_scale)
    args += (inv_temp, ignore_index, cap, pre)
    flags = dict(HAS_ENTROPY=return_entropy, SOFTCAP=has_cap)
    with device_of(logits):
        if interpreting():
            _token_logprobs_fwd_kernel.fn[(n,)](*args, **flags, BLOCK_V=_block(vocab_size))
        else:
            _token_logprobs_fwd_kernel[(n,)](*args, **flags)
            best = getattr(_token_logprobs_fwd_kernel, "best_config", None)
            if best is not None:
                _chosen[("fwd", v_total, logits.dtype)] = best
    return logp, lse, entropy


def token_logprobs_bwd(
    logits: torch.Tensor,
    layout: tuple[int, int, int],
    dlogits: torch.Tensor,
    d_layout: tuple[int, int, int],
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_temp: float,
    ignore_index: int,
    vocab_size: int,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> None:
    """Write dlogits (which may be ``logits`` itself) for every row, padded columns = 0."""
    n = labels.numel()
    if n == 0:
        return
    has_h = grad_entropy is not None
    v_total = logits.shape[-1]
    t_inner, s_outer, s_inner = layout
    args = (logits, dlogits, labels, lse, entropy if has_h else lse, grad_logp)
    args += (grad_entropy if has_h else grad_logp, t_inner, s_outer, s_inner)
    inv_temp, cap, pre, has_cap = head_args(inv_temp, softcap, logit_scale)
    args += (d_layout[1], d_layout[2], vocab_size, v_total, inv_temp, ignore_index, cap, pre)
    with device_of(logits):
        if interpreting():
            rnd = needs_bf16_rounding(dlogits)
            _token_logprobs_bwd_kernel[(n,)](
                *args,
                HAS_ENTROPY_GRAD=has_h,
                SOFTCAP=has_cap,
                ROUND_BF16=rnd,
                BLOCK_V=_block(v_total),
            )
        elif dlogits is logits or (dlogits.data_ptr() == logits.data_ptr() and not logits.is_meta):
            cfg = _inplace_config(v_total, has_h, logits.dtype)
            _token_logprobs_bwd_kernel[(n,)](
                *args,
                HAS_ENTROPY_GRAD=has_h,
                SOFTCAP=has_cap,
                ROUND_BF16=False,
                **cfg.all_kwargs(),
            )
        else:
            _bwd_autotuned[(n,)](*args, HAS_ENTROPY_GRAD=has_h, SOFTCAP=has_cap, ROUND_BF16=False)
            best = getattr(_bwd_autotuned, "best_config", None)
            if best is not None:
                _chosen[("bwd", v_total, has_h, logits.dtype)] = best
