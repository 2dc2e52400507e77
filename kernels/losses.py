"""Triton kernels for the RL losses: kl_penalty, ppo_policy_loss, value_loss.

Shapes: N = tokens, flattened ([B, T] padded inputs are N = B * T with sequences of
length T; packed inputs are [N] with cu_seqlens [S + 1]); S = sequences; K = 16 slots
of per-sequence statistics.

kl_penalty: one elementwise kernel each way (grid over N).

ppo_policy_loss / value_loss: ONE launch forward and ONE launch backward.
- Forward: one program per sequence walks its tokens, computes the per-token loss and
  the metric terms, and writes K partial sums (masked loss sum, token count, the
  sequence's mean and sum, metric sums, a max) to ``partials[s, :]``. Then a two-level
  ticket reduction (int32 atomic counters): the last program of each group of ~sqrt(S)
  sequences reduces its group's rows, and the last group to finish reduces the group
  rows and writes the final loss and metrics to ``stats[K]``. Deterministic (fixed
  order, no float atomics), no host sync, and its serial tail is two short loads, not
  one program walking all S rows; its only other launch is the zero-fill of the
  tickets. The partials stay alive for the backward (per-sequence token counts).
- Backward: one program per sequence recomputes the per-token terms from the inputs
  (cheaper than storing them) and writes dloss/dlogp = g * w_s * m_t * dl_t with the
  aggregation weight w_s read from ``stats`` / ``partials``.
Parallelism is therefore the number of sequences; a batch of very few very long
sequences would use few SMs (split such sequences into more rows upstream).

Sequence s covers tokens [s * T, (s + 1) * T) (padded) or [cu[s], cu[s + 1]) (packed,
each offset clamped into [0, N], so no layout can make a kernel read or write out of
bounds). A packed input's gradient buffer is zero-filled: a token no sequence covers
(only an invalid layout leaves one) gets 0.

Statistics layout (partials[s, j] and, after the reduction, stats[j]):
    0 loss (stats) / sum m*l (partials)   1 sum m   2 sum of per-sequence means
    3 sum of per-sequence sums            4 non-empty sequences
    5.. metric sums (stats: divided by sum m); 8 is a max over masked tokens instead.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastrlhf.kernels import interpreting
from fastrlhf.kernels._launch import device_of
from fastrlhf.kernels.logprobs import needs_bf16_rounding, round_to_bf16

K = 16  # statistics slots (the layout is above)
# metric name -> its slot of stats, as _store_partials below fills them
PPO_METRICS = {
    "clip_frac": 5, "dual_clip_frac": 11, "approx_kl": 6, "ratio_mean": 7, "ratio_max": 8,
    "pg_loss": 12, "kl": 9, "entropy": 10,
}  # fmt: skip
VALUE_METRICS = {"clip_frac": 5, "values_mean": 6, "values_max": 8, "mse": 7}


# ---------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _clamp(x, lo, hi):
    # NaN must reach the loss: the default min/max return the non-NaN operand.
    x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _out(x, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        x = round_to_bf16(x)
    return x


@triton.jit
def _kl_value_grad(x, ref, KIND: tl.constexpr, ST: tl.constexpr):
    """(value, d value / d x) of the KL estimator at logp = x; d / d ref is its negative."""
    diff = x - ref
    if KIND == 0:
        value = diff
        grad = diff * 0.0 + 1.0
    elif KIND == 1:
        value = tl.abs(diff)
        grad = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    elif KIND == 2:
        value = 0.5 * diff * diff
        grad = diff
    else:
        # Same clamps as torch.clamp, whose gradient passes at the boundaries.
        d_raw = -diff
        d = _clamp(d_raw, -20.0, 20.0)
        e = tl.exp(d)
        raw = e - d - 1.0
        value = _clamp(raw, -10.0, 10.0)
        pass_d = (d_raw >= -20.0) & (d_raw <= 20.0)
        pass_v = (raw >= -10.0) & (raw <= 10.0)
        grad = tl.where(pass_d & pass_v, 1.0 - e, 0.0)
    if ST:
        grad = diff  # straight-through: the gradient of k2
    return value, grad


@triton.jit
def _seq_bounds(cu_ptr, T, N, HAS_CU: tl.constexpr):
    s = tl.program_id(0)
    if HAS_CU:
        # Clamped into [0, N] and end >= start: offsets that are not a valid layout
        # (validate=False) give wrong sums, never a read or write outside the buffers.
        start = tl.minimum(tl.maximum(tl.load(cu_ptr + s).to(tl.int64), 0), N)
        end = tl.minimum(tl.maximum(tl.load(cu_ptr + s + 1).to(tl.int64), start), N)
    else:
        start = s.to(tl.int64) * T
        end = start + T
    return start, end


@triton.jit
def _load_tokens(off, end, mask_ptr, a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    """One block of a sequence's tokens from ``off``: (idx, in range, mask, a, b, c), float32."""
    idx = off + tl.arange(0, BLOCK)
    ok = idx < end
    m = tl.load(mask_ptr + idx, mask=ok, other=0).to(tl.float32)
    a = tl.load(a_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    return idx, ok, m, a, b, c


@triton.jit
def _store_partials(pp, sum_l, cnt, zero, m5, m6, m7, m8, m9, m10, m11, m12):
    nonempty = cnt > 0
    safe = tl.where(nonempty, cnt, 1.0)
    tl.store(pp + 0, sum_l)
    tl.store(pp + 1, cnt)
    tl.store(pp + 2, tl.where(nonempty, sum_l / safe, 0.0))
    tl.store(pp + 3, tl.where(nonempty, sum_l, 0.0))
    tl.store(pp + 4, tl.where(nonempty, 1.0, 0.0))
    tl.store(pp + 5, m5)
    tl.store(pp + 6, m6)
    tl.store(pp + 7, m7)
    tl.store(pp + 8, m8)
    tl.store(pp + 9, m9)
    tl.store(pp + 10, m10)
    tl.store(pp + 11, m11)
    tl.store(pp + 12, m12)
    tl.store(pp + 13, zero)
    tl.store(pp + 14, zero)
    tl.store(pp + 15, zero)


@triton.jit
def _col(vec, cols, j: tl.constexpr):
    return tl.sum(tl.where(cols == j, vec, 0.0), axis=0)


@triton.jit
def _reduce_rows(ptr, lo, hi, cols, BLOCK_P: tl.constexpr):
    """(column sums, column maxes) of rows [lo, hi) of a [*, 16] float32 table."""
    acc_sum = tl.zeros([16], tl.float32)
    acc_max = tl.full([16], float("-inf"), tl.float32)
    for p0 in range(lo, hi, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        ok = rows[:, None] < hi
        ptrs = ptr + rows[:, None].to(tl.int64) * 16 + cols[None, :]
        # .cg: bypass L1, so the other SMs' stores (ordered by their tickets) are seen
        blk = tl.load(ptrs, mask=ok, other=0.0, cache_modifier=".cg")  # [BLOCK_P, 16]
        acc_sum += tl.sum(blk, axis=0)
        acc_max = tl.maximum(acc_max, tl.max(tl.where(ok, blk, float("-inf")), axis=0))
    return acc_sum, acc_max


@triton.jit
def _finish(
    partials_ptr, group_ptr, stats_ptr, counter_ptr, P, AGG: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Two-level reduction of partials [P, K] into stats [K], in a fixed order.

    Programs form groups of BLOCK_P consecutive sequences; the last of a group to take a
    ticket (counter[1 + group]) reduces the group's rows into group row ``group`` (column
    8 a max, the others sums), and the last group to finish (counter[0]) reduces the
    group rows. Each reduction is one [BLOCK_P, K] load when P <= BLOCK_P^2 (the host
    picks BLOCK_P ~ sqrt(P)): two short steps instead of one program walking all P rows.
    """
    # Every thread's stores happen before the (release) ticket; the reader acquires it.
    tl.debug_barrier()
    group = tl.program_id(0) // BLOCK_P
    lo = group * BLOCK_P
    hi = tl.minimum(lo + BLOCK_P, P)
    ticket = tl.atomic_add(counter_ptr + 1 + group, 1)
    if ticket == hi - lo - 1:
        cols = tl.arange(0, 16)
        g_sum, g_max = _reduce_rows(partials_ptr, lo, hi, cols, BLOCK_P)
        tl.store(group_ptr + group * 16 + cols, tl.where(cols == 8, g_max, g_sum))
        tl.debug_barrier()
        num_groups = tl.cdiv(P, BLOCK_P)
        if tl.atomic_add(counter_ptr, 1) == num_groups - 1:
            acc_sum, acc_max = _reduce_rows(group_ptr, 0, num_groups, cols, BLOCK_P)
            count = _col(acc_sum, cols, 1)
            nonempty = _col(acc_sum, cols, 4)
            if AGG == 0:
                num = _col(acc_sum, cols, 0)
                den = count
            elif AGG == 1:
                num = _col(acc_sum, cols, 2)
                den = nonempty
            else:
                num = _col(acc_sum, cols, 3)
                den = nonempty
            loss = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
            out = acc_sum / tl.where(count > 0, count, 1.0)
            out = tl.where(cols == 8, tl.where(count > 0, acc_max, 0.0), out)
            out = tl.where(cols < 5, acc_sum, out)
            out = tl.where(cols == 0, loss, out)
            tl.store(stats_ptr + cols, out)


@triton.jit
def _agg_weight(grad_ptr, stats_ptr, partials_ptr, AGG: tl.constexpr):
    """d loss / d (m_t l_t) for every token of this program's sequence."""
    g = tl.load(grad_ptr).to(tl.float32)
    if AGG == 0:
        den = tl.load(stats_ptr + 1)
    else:
        den = tl.load(stats_ptr + 4)
        if AGG == 1:
            cnt = tl.load(partials_ptr + tl.program_id(0).to(tl.int64) * 16 + 1)
            den = den * cnt
    return tl.where(den > 0, g / tl.where(den > 0, den, 1.0), 0.0)


# ---------------------------------------------------------------------------------------
# kl_penalty


@triton.jit
def _kl_fwd_kernel(
    x_ptr, r_ptr, out_ptr, N, KIND: tl.constexpr, ST: tl.constexpr, BLOCK: tl.constexpr
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < N
    x = tl.load(x_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    value, _ = _kl_value_grad(x, r, KIND, ST)
    tl.store(out_ptr + idx, value.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _kl_bwd_kernel(
    x_ptr, r_ptr, g_ptr, dx_ptr, dr_ptr, N, KIND: tl.constexpr, ST: tl.constexpr,
    ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < N
    x = tl.load(x_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    _, grad = _kl_value_grad(x, r, KIND, ST)
    tl.store(dx_ptr + idx, _out(g * grad, ROUND_BF16).to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dr_ptr + idx, _out(-g * grad, ROUND_BF16).to(dr_ptr.dtype.element_ty), mask=ok)


def _elementwise_block(n: int) -> int:
    if interpreting():
        return min(triton.next_power_of_2(max(n, 16)), 1 << 16)
    return 1024


def kl_penalty_fwd(logp: torch.Tensor, ref: torch.Tensor, kind: int, st: bool) -> torch.Tensor:
    """Elementwise KL estimate of flat contiguous [N] inputs; float32 out."""
    out = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    n = logp.numel()
    if n:
        block = _elementwise_block(n)
        with device_of(logp):
            _kl_fwd_kernel[(triton.cdiv(n, block),)](logp, ref, out, n, kind, st, block)
    return out


def kl_penalty_bwd(logp, ref, grad, kind: int, st: bool) -> tuple[torch.Tensor, torch.Tensor]:
    d_logp = torch.empty_like(logp)
    d_ref = torch.empty_like(ref)
    n = logp.numel()
    if n:
        block = _elementwise_block(n)
        rnd = needs_bf16_rounding(logp)
        with device_of(logp):
            _kl_bwd_kernel[(triton.cdiv(n, block),)](
                logp, ref, grad, d_logp, d_ref, n, kind, st, rnd, block
            )
    return d_logp, d_ref


# ---------------------------------------------------------------------------------------
# ppo_policy_loss


@triton.jit
def _ppo_token(x, o, a, clip_lo, clip_hi, dual_c, DUAL: tl.constexpr):
    """Per-token surrogate: (pg, d pg / d logp, ratio, log_ratio, clipped, dual)."""
    raw = x - o
    log_ratio = _clamp(raw, -20.0, 20.0)
    ratio = tl.exp(log_ratio)
    pg1 = -a * ratio
    pg2 = -a * _clamp(ratio, 1.0 - clip_lo, 1.0 + clip_hi)
    # pg1 >= pg2: the unclipped term is active (on a tie both have the same slope).
    grad = tl.where((pg1 >= pg2) & (raw >= -20.0) & (raw <= 20.0), pg1, 0.0)
    pg = tl.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if DUAL:
        pg3 = -a * dual_c
        dual = (a < 0) & (pg > pg3)
        pg = tl.where(dual, pg3, pg)
        grad = tl.where(dual, 0.0, grad)
    else:
        dual = ratio < 0.0  # all False (ratio >= 0), with the right shape
    return pg, grad, ratio, log_ratio, clipped, dual


@triton.jit
def _ppo_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, cu_ptr,
    partials_ptr, group_ptr, stats_ptr, counter_ptr,
    T, N, P, clip_lo, clip_hi, dual_c, kl_coef, ent_coef,
    HAS_CU: tl.constexpr, DUAL: tl.constexpr, HAS_KL: tl.constexpr, KL_KIND: tl.constexpr,
    KL_ST: tl.constexpr, HAS_ENT: tl.constexpr, AGG: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    start, end = _seq_bounds(cu_ptr, T, N, HAS_CU)
    acc_l = tl.zeros([BLOCK], tl.float32)
    acc_m = tl.zeros([BLOCK], tl.float32)
    acc_clip = tl.zeros([BLOCK], tl.float32)
    acc_akl = tl.zeros([BLOCK], tl.float32)
    acc_ratio = tl.zeros([BLOCK], tl.float32)
    acc_rmax = tl.full([BLOCK], float("-inf"), tl.float32)
    acc_kl = tl.zeros([BLOCK], tl.float32)
    acc_ent = tl.zeros([BLOCK], tl.float32)
    acc_dual = tl.zeros([BLOCK], tl.float32)
    acc_pg = tl.zeros([BLOCK], tl.float32)
    for off in range(start, end, BLOCK):
        idx, ok, m, x, o, a = _load_tokens(off, end, mask_ptr, logp_ptr, old_ptr, adv_ptr, BLOCK)
        pg, _, ratio, log_ratio, clipped, dual = _ppo_token(x, o, a, clip_lo, clip_hi, dual_c, DUAL)
        loss = pg
        if HAS_KL:
            r = tl.load(ref_ptr + idx, mask=ok, other=0.0).to(tl.float32)
            kl, _ = _kl_value_grad(x, r, KL_KIND, KL_ST)
            loss += kl_coef * kl
            acc_kl += tl.where(m != 0, kl, 0.0) * m
        if HAS_ENT:
            h = tl.load(ent_ptr + idx, mask=ok, other=0.0).to(tl.float32)
            loss -= ent_coef * h
            acc_ent += tl.where(m != 0, h, 0.0) * m
        keep = m != 0  # masked positions never contribute, even if they hold NaN
        acc_l += tl.where(keep, loss, 0.0) * m
        acc_m += m
        acc_clip += tl.where(keep & clipped, m, 0.0)
        acc_dual += tl.where(keep & dual, m, 0.0)
        acc_akl += tl.where(keep, ratio - 1.0 - log_ratio, 0.0) * m
        acc_ratio += tl.where(keep, ratio, 0.0) * m
        acc_rmax = tl.maximum(acc_rmax, tl.where(keep, ratio, float("-inf")))
        acc_pg += tl.where(keep, pg, 0.0) * m
    pp = partials_ptr + tl.program_id(0).to(tl.int64) * 16
    _store_partials(
        pp, tl.sum(acc_l, 0), tl.sum(acc_m, 0), 0.0, tl.sum(acc_clip, 0), tl.sum(acc_akl, 0),
        tl.sum(acc_ratio, 0), tl.max(acc_rmax, 0), tl.sum(acc_kl, 0), tl.sum(acc_ent, 0),
        tl.sum(acc_dual, 0), tl.sum(acc_pg, 0),
    )  # fmt: skip
    _finish(partials_ptr, group_ptr, stats_ptr, counter_ptr, P, AGG, BLOCK_P)


@triton.jit
def _ppo_bwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, cu_ptr, partials_ptr, stats_ptr, grad_ptr,
    dlogp_ptr, dent_ptr,
    T, N, S, clip_lo, clip_hi, dual_c, kl_coef, ent_coef,
    HAS_CU: tl.constexpr, DUAL: tl.constexpr, HAS_KL: tl.constexpr, KL_KIND: tl.constexpr,
    KL_ST: tl.constexpr, HAS_ENT: tl.constexpr, AGG: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    start, end = _seq_bounds(cu_ptr, T, N, HAS_CU)
    w = _agg_weight(grad_ptr, stats_ptr, partials_ptr, AGG)
    for off in range(start, end, BLOCK):
        idx, ok, m, x, o, a = _load_tokens(off, end, mask_ptr, logp_ptr, old_ptr, adv_ptr, BLOCK)
        _, dl, _, _, _, _ = _ppo_token(x, o, a, clip_lo, clip_hi, dual_c, DUAL)
        if HAS_KL:
            r = tl.load(ref_ptr + idx, mask=ok, other=0.0).to(tl.float32)
            _, kg = _kl_value_grad(x, r, KL_KIND, KL_ST)
            dl += kl_coef * kg
        scale = tl.where(m != 0, m * w, 0.0)
        tl.store(
            dlogp_ptr + idx, _out(dl * scale, ROUND_BF16).to(dlogp_ptr.dtype.element_ty), mask=ok
        )
        if HAS_ENT:
            tl.store(dent_ptr + idx, (-ent_coef * scale).to(dent_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------
# value_loss


@triton.jit
def _value_token(v, ov, ret, clip, HAS_CLIP: tl.constexpr):
    """Per-token 0.5 * max((v-R)^2, (clipped v - R)^2): (loss, d loss / d v, clipped)."""
    err = v - ret
    l1 = err * err
    if HAS_CLIP:
        dv = v - ov
        vc = ov + _clamp(dv, -clip, clip)
        err2 = vc - ret
        l2 = err2 * err2
        use2 = l2 > l1
        inside = (dv >= -clip) & (dv <= clip)
        loss = 0.5 * tl.maximum(l1, l2)
        grad = tl.where(use2, tl.where(inside, err2, 0.0), err)
    else:
        loss = 0.5 * l1
        grad = err
        use2 = l1 < 0.0  # all False, with the right shape
    return loss, grad, use2, l1


@triton.jit
def _value_fwd_kernel(
    v_ptr, ov_ptr, ret_ptr, mask_ptr, cu_ptr, partials_ptr, group_ptr, stats_ptr, counter_ptr,
    T, N, P, clip,
    HAS_CU: tl.constexpr, HAS_CLIP: tl.constexpr, AGG: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    start, end = _seq_bounds(cu_ptr, T, N, HAS_CU)
    acc_l = tl.zeros([BLOCK], tl.float32)
    acc_m = tl.zeros([BLOCK], tl.float32)
    acc_clip = tl.zeros([BLOCK], tl.float32)
    acc_v = tl.zeros([BLOCK], tl.float32)
    acc_mse = tl.zeros([BLOCK], tl.float32)
    acc_vmax = tl.full([BLOCK], float("-inf"), tl.float32)
    for off in range(start, end, BLOCK):
        idx, ok, m, v, ov, ret = _load_tokens(off, end, mask_ptr, v_ptr, ov_ptr, ret_ptr, BLOCK)
        loss, _, clipped, l1 = _value_token(v, ov, ret, clip, HAS_CLIP)
        keep = m != 0
        acc_l += tl.where(keep, loss, 0.0) * m
        acc_m += m
        acc_clip += tl.where(keep & clipped, m, 0.0)
        acc_v += tl.where(keep, v, 0.0) * m
        acc_mse += tl.where(keep, l1, 0.0) * m
        acc_vmax = tl.maximum(acc_vmax, tl.where(keep, v, float("-inf")))
    pp = partials_ptr + tl.program_id(0).to(tl.int64) * 16
    _store_partials(
        pp, tl.sum(acc_l, 0), tl.sum(acc_m, 0), 0.0, tl.sum(acc_clip, 0), tl.sum(acc_v, 0),
        tl.sum(acc_mse, 0), tl.max(acc_vmax, 0), 0.0, 0.0, 0.0, 0.0,
    )  # fmt: skip
    _finish(partials_ptr, group_ptr, stats_ptr, counter_ptr, P, AGG, BLOCK_P)


@triton.jit
def _value_bwd_kernel(
    v_ptr, ov_ptr, ret_ptr, mask_ptr, cu_ptr, partials_ptr, stats_ptr, grad_ptr, dv_ptr,
    T, N, S, clip,
    HAS_CU: tl.constexpr, HAS_CLIP: tl.constexpr, AGG: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    start, end = _seq_bounds(cu_ptr, T, N, HAS_CU)
    w = _agg_weight(grad_ptr, stats_ptr, partials_ptr, AGG)
    for off in range(start, end, BLOCK):
        idx, ok, m, v, ov, ret = _load_tokens(off, end, mask_ptr, v_ptr, ov_ptr, ret_ptr, BLOCK)
        _, dl, _, _ = _value_token(v, ov, ret, clip, HAS_CLIP)
        scale = tl.where(m != 0, m * w, 0.0)
        tl.store(dv_ptr + idx, _out(dl * scale, ROUND_BF16).to(dv_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------
# launchers (inputs: flat contiguous [N] tensors; ``cu`` None for padded [S, T] inputs)


def _blocks(n: int, s: int) -> tuple[int, int, int]:
    """(BLOCK over tokens, BLOCK_P sequences per reduction group, num_warps)."""
    if interpreting():
        per_seq = max(1, n // max(s, 1))
        return min(triton.next_power_of_2(per_seq), 4096), 1024, 1
    # ~sqrt(S) groups of ~sqrt(S) rows: both reduction levels are one load up to 65536
    group = min(256, max(16, triton.next_power_of_2(math.isqrt(max(s - 1, 0)) + 1)))
    return 1024, group, 4


def _new_stats(device: torch.device, s: int, block_p: int):
    """stats [K], partials [S, K] (kept for the backward), and one zeroed scratch buffer:
    the group rows [G, K] and the G + 1 int32 tickets (one allocation, one fill)."""
    groups = triton.cdiv(s, block_p)
    stats = torch.empty(K, dtype=torch.float32, device=device)
    partials = torch.empty((s, K), dtype=torch.float32, device=device)
    scratch = torch.zeros(groups * K + groups + 1, dtype=torch.float32, device=device)
    return stats, partials, scratch[: groups * K], scratch[groups * K :].view(torch.int32)


def ppo_fwd(logp, old, adv, mask, ref, ent, cu, t, s, clip_lo, clip_hi, dual, kl_coef, kl_kind,
            kl_st, ent_coef, agg):  # fmt: skip
    """Returns (stats [K], partials [S, K]); see the module docstring for the layout."""
    block, block_p, warps = _blocks(logp.numel(), s)
    stats, partials, group, counter = _new_stats(logp.device, s, block_p)
    if s == 0:
        return stats.zero_(), partials
    with device_of(logp):
        _ppo_fwd_kernel[(s,)](
            logp, old, adv, mask, ref if ref is not None else logp,
            ent if ent is not None else logp, cu if cu is not None else counter, partials, group,
            stats, counter,
            t, logp.numel(), s, clip_lo, clip_hi, dual if dual is not None else 0.0, kl_coef,
            ent_coef,
            HAS_CU=cu is not None, DUAL=dual is not None, HAS_KL=ref is not None,
            KL_KIND=kl_kind, KL_ST=kl_st, HAS_ENT=ent is not None, AGG=agg,
            BLOCK=block, BLOCK_P=block_p, num_warps=warps,
        )  # fmt: skip
    return stats, partials


def ppo_bwd(logp, old, adv, mask, ref, cu, partials, stats, grad, t, s, clip_lo, clip_hi, dual,
            kl_coef, kl_kind, kl_st, ent_coef, want_dent, agg):  # fmt: skip
    """Returns (d logp [N] in logp's dtype, d entropy [N] float32 or None)."""
    # packed: tokens outside every sequence are never visited, so they start at 0
    new = torch.empty if s and cu is None else torch.zeros
    dlogp = new(logp.shape, dtype=logp.dtype, device=logp.device)
    dent = new(logp.shape, dtype=torch.float32, device=logp.device) if want_dent else None
    if s == 0:
        return dlogp, dent
    block, _, warps = _blocks(logp.numel(), s)
    with device_of(logp):
        _ppo_bwd_kernel[(s,)](
            logp, old, adv, mask, ref if ref is not None else logp, cu if cu is not None else stats,
            partials, stats, grad, dlogp, dent if dent is not None else dlogp,
            t, logp.numel(), s, clip_lo, clip_hi, dual if dual is not None else 0.0, kl_coef,
            ent_coef,
            HAS_CU=cu is not None, DUAL=dual is not None, HAS_KL=ref is not None,
            KL_KIND=kl_kind, KL_ST=kl_st, HAS_ENT=want_dent, AGG=agg,
            ROUND_BF16=needs_bf16_rounding(logp), BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return dlogp, dent


def value_fwd(values, old, returns, mask, cu, t, s, clip, agg):
    block, block_p, warps = _blocks(values.numel(), s)
    stats, partials, group, counter = _new_stats(values.device, s, block_p)
    if s == 0:
        return stats.zero_(), partials
    with device_of(values):
        _value_fwd_kernel[(s,)](
            values, old, returns, mask, cu if cu is not None else counter, partials, group, stats,
            counter, t, values.numel(), s, clip if clip is not None else 0.0,
            HAS_CU=cu is not None, HAS_CLIP=clip is not None, AGG=agg, BLOCK=block, BLOCK_P=block_p,
            num_warps=warps,
        )  # fmt: skip
    return stats, partials


def value_bwd(values, old, returns, mask, cu, partials, stats, grad, t, s, clip, agg):
    new = torch.empty if s and cu is None else torch.zeros
    dv = new(values.shape, dtype=values.dtype, device=values.device)
    if s == 0:
        return dv
    block, _, warps = _blocks(values.numel(), s)
    with device_of(values):
        _value_bwd_kernel[(s,)](
            values, old, returns, mask, cu if cu is not None else stats, partials, stats, grad, dv,
            t, values.numel(), s, clip if clip is not None else 0.0,
            HAS_CU=cu is not None, HAS_CLIP=clip is not None, AGG=agg,
            ROUND_BF16=needs_bf16_rounding(values), BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return dv
