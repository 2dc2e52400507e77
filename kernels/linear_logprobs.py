"""Triton kernels for fused lm_head + token log-prob: logits are never stored whole.

Legend: N = tokens (rows), H = hidden size, V = vocabulary columns in use
(``vocab_size``; the weight may have more rows, which are never read),
S = vocabulary splits of the forward, Vb = one vocabulary block of the backward.

With ``z = (hidden @ weight[:V].T + bias[:V]) / T`` (float32 accumulation):

- forward, ``linear_logprobs_fwd``: a program owns BLOCK_N rows and one contiguous
  slice of the vocabulary (split s of S). It walks its slice in [BLOCK_N, BLOCK_V]
  tiles, each the result of a K loop of ``tl.dot`` over H, and keeps per row only a
  running max ``m``, a running ``sum exp(z - m)`` and, for the entropy, a running
  ``sum exp(z - m) * z``, plus the label's ``z``. A tiny merge over S (PyTorch, [S, N]
  floats) gives ``lse``, ``logprob = z_label - lse`` and ``entropy = lse - E_p[z]``.
  Extra memory: 4 * S * N floats.
- backward, ``linear_logprobs_dlogits``: for one vocabulary block [v_lo, v_hi), it
  recomputes the z tile and writes ``dlogits = dz / T`` into a bounded [N, Vb]
  buffer, where ``dz = g * (onehot - p) - g_ent * p * (z - lse + entropy)`` (the
  derivative of ``entropy = -sum p log p`` is ``-p * (log p + entropy)``). The caller
  turns the buffer into dH and dW with two cuBLAS matmuls (fastrlhf/ops/linear_logprobs.py).

Post-head transform (HF's order, constexpr SOFTCAP, fp32 on the tile): the logits are
scaled, then capped, ``x = cap * tanh(logits * pre)`` with pre = scale / cap, then
divided by T; without a cap the scale is folded into inv_temp. The backward keeps tanh
of the recomputed tile and multiplies dz by d x / d logits = scale * (1 - th^2)
(kernels.logprobs.head_args, tanh_and_sech2).

Under TRITON_INTERPRET=1 (CPU tests) bf16/fp16 ``tl.dot`` is silently wrong, so the
UPCAST flag converts tiles to float32 before the dot; on a GPU the dot stays in the
input dtype on tensor cores. Autotuning is pruned to one shape-derived config under
the interpreter, where benchmarking configs is impossible and every program instance
costs milliseconds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrlhf.kernels import interpreting
from fastrlhf.kernels._launch import device_of
from fastrlhf.kernels.logprobs import head_args, tanh_and_sech2, tanh_f32

# Every BLOCK_V below divides this, so a forward split (a multiple of it) is walked in
# whole tiles and only the split that ends at V needs a column mask.
_SPLIT_ALIGN = 2048
SPLIT_ALIGN = tl.constexpr(_SPLIT_ALIGN)


def _gpu_configs() -> list[triton.Config]:
    # Each config compiles for sm_90 and sm_80 without register spills in every dtype
    # (`make kernel-check`). The accumulator of one [BLOCK_N, BLOCK_V] fp32 tile takes
    # BLOCK_N * BLOCK_V / (32 * warps) registers per thread and the forward's epilogue
    # (exp, max, the entropy product) keeps about two more tiles alive, so tiles stay at
    # 64 accumulator registers per thread or fewer. BLOCK_K = 32 (64 B of bf16, 128 B of
    # fp32 per row): with 64, sm_80's register-fed mma.sync operands spill at 128 rows,
    # and fp32 stages overflow its shared memory.
    shapes = [
        (128, 128, 32, 8, 4),
        (64, 256, 32, 8, 5),
        (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 4),
    ]
    return _configs(shapes)


def _configs(shapes) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bv, bk, w, s in shapes
    ]


# fp32 inputs (TF32 / 3xTF32 tensor-core dots): twice the bytes per element and, for
# 3xTF32, split operands held in registers, so smaller tiles than bf16; no 32-row tile
# (sm_90's wgmma needs 64 rows, a 32-row tile falls back to mma.sync).
_FP32_CONFIGS = {
    "tf32": _configs([(128, 64, 32, 8, 3), (64, 64, 32, 8, 3), (64, 64, 16, 4, 4)]),
    "tf32x3": _configs([(64, 128, 16, 8, 3), (64, 64, 32, 8, 3), (64, 64, 16, 4, 4)]),
}


def _all_configs():
    yield from _gpu_configs()
    for cfgs in _FP32_CONFIGS.values():
        yield from cfgs


def _row_bucket(n: int) -> int:
    """Autotune key for the row count: powers of two, so a new N retunes only when its
    best tile can change (the tile is chosen per bucket, not frozen at the first N)."""
    return triton.next_power_of_2(max(int(n), 1))


def _prune(configs, named_args, **kwargs):
    """On a GPU the bf16/fp16 configs, or fp32's own; under the interpreter one config
    sized to the problem."""
    if not interpreting():
        if named_args["h_ptr"].dtype == torch.float32:
            return _FP32_CONFIGS[kwargs["DOT_PRECISION"]]
        return configs
    n, h, v = named_args["N"], named_args["H"], named_args["V"]
    bn = max(16, min(64, triton.next_power_of_2(n)))
    bv = 2048 if v >= 16384 else 512  # fewer, larger tiles: loop iterations cost most
    bk = max(16, min(128, triton.next_power_of_2(h)))
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=4)]


_heuristics = triton.heuristics({"EVEN_K": lambda a: a["H"] % a["BLOCK_K"] == 0})


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    H,
    stride_hn,
    stride_wv,
    inv_temp,
    cap,
    pre,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """z = head(hidden[rows] @ weight[cols].T + bias[cols]) * inv_temp, float32
    [BLOCK_N, BLOCK_V]; head = cap * tanh(. * pre) under SOFTCAP, else the identity.

    ``rows`` / ``cols`` are consecutive: the K loop advances two scalar 64-bit base
    pointers over int32 in-tile offsets, instead of a 64-bit pointer per loaded element
    (registers: the difference between spilling and not at 128-row tiles on sm_80)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    h_base = h_ptr + tl.min(rows, axis=0).to(tl.int64) * stride_hn
    w_base = w_ptr + tl.min(cols, axis=0).to(tl.int64) * stride_wv
    h_off = tl.arange(0, BLOCK_N)[:, None] * stride_hn + ks[None, :]  # [BLOCK_N, BLOCK_K]
    w_off = tl.arange(0, BLOCK_V)[:, None] * stride_wv + ks[None, :]  # [BLOCK_V, BLOCK_K]
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            h = tl.load(h_base + h_off, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_base + w_off, mask=col_mask[:, None], other=0.0)
        else:
            k_mask = (k0 + ks) < H
            h = tl.load(h_base + h_off, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_base + w_off, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_base += BLOCK_K
        w_base += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = cap * tanh_f32(acc * pre)
    return acc * inv_temp


@triton.autotune(
    configs=_gpu_configs(),
    key=["N_BUCKET", "H", "V"],
    prune_configs_by={"early_config_prune": _prune},
)
@_heuristics
@triton.jit
def _fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    labels_ptr,
    part_ptr,  # [4, S_ALLOC, N] float32: max, sum exp, sum exp * z, label z
    N,
    N_BUCKET,  # autotune key only
    H,
    V,
    S_ALLOC,
    stride_hn,
    stride_wv,
    inv_temp,
    cap,
    pre,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # The split varies fastest: programs running together share a few row blocks of
    # hidden (L2-resident across their vocabulary tiles) and read different weight
    # slices, instead of each streaming its own rows from HBM for every tile.
    num_splits = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)
    split = tl.program_id(0) % num_splits
    pid_n = tl.program_id(0) // num_splits
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_per_split = tl.cdiv(tl.cdiv(V, num_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_wv,
            inv_temp, cap, pre, HAS_BIAS, SOFTCAP, UPCAST, DOT_PRECISION, EVEN_K, BLOCK_N,
            BLOCK_V, BLOCK_K,
        )  # fmt: skip
        # Masked columns get a finite -1e30, not -inf: their e is still exp(-huge) = 0
        # and e * z = 0 (0 * -inf would be NaN), so one tile serves max, sum and entropy
        # (fewer live tiles: fewer registers).
        z = tl.where(col_mask[None, :], z, -1.0e30)
        y += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        # Every tile has at least one real column, so m_new is finite and exp(m - m_new)
        # is 0 (not NaN) on the first tile, where m = -inf.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        if WITH_ENTROPY:
            t = t * alpha + tl.sum(e * z, axis=1)
        m = m_new

    plane = S_ALLOC * N
    base = part_ptr + split * N + rows
    tl.store(base, m, mask=row_mask)
    tl.store(base + plane, s, mask=row_mask)
    tl.store(base + 2 * plane, t, mask=row_mask)
    tl.store(base + 3 * plane, y, mask=row_mask)
    if split == 0:
        # Splits this tile size did not use (the buffer is sized for the smallest
        # BLOCK_N) get the merge's neutral element: max -inf, sums 0.
        for unused in range(num_splits, S_ALLOC):
            base = part_ptr + unused * N + rows
            tl.store(base, tl.full((BLOCK_N,), float("-inf"), tl.float32), mask=row_mask)
            tl.store(base + plane, s * 0.0, mask=row_mask)
            tl.store(base + 2 * plane, s * 0.0, mask=row_mask)
            tl.store(base + 3 * plane, s * 0.0, mask=row_mask)


@triton.autotune(
    configs=_gpu_configs(),
    key=["N_BUCKET", "H", "V"],
    prune_configs_by={"early_config_prune": _prune},
)
@_heuristics
@triton.jit
def _dlogits_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    labels_ptr,
    lse_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    dl_ptr,  # [N, >= v_hi - v_lo], row stride stride_dn
    N,
    N_BUCKET,  # autotune key only
    H,
    V,  # only an autotune key: the vocabulary in use
    v_lo,
    v_hi,
    stride_hn,
    stride_wv,
    stride_dn,
    inv_temp,
    cap,
    pre,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_ENT_GRAD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr = 8,
):
    # Grouped launch order (as in Triton's matmul tutorial): programs running together
    # cover GROUP_N row blocks x all column tiles, so their hidden and weight tiles are
    # re-read from L2 instead of HBM.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(v_hi - v_lo, BLOCK_V)
    group = GROUP_N * num_v
    first_n = (pid // group) * GROUP_N
    group_rows = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % group) % group_rows
    pid_v = (pid % group) // group_rows
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < v_hi
    z = _logits_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        rows,
        cols,
        row_mask,
        col_mask,
        H,
        stride_hn,
        stride_wv,
        inv_temp,
        cap,
        pre,
        HAS_BIAS,
        False,
        UPCAST,
        DOT_PRECISION,
        EVEN_K,
        BLOCK_N,
        BLOCK_V,
        BLOCK_K,
    )  # fmt: skip  (logits / T: the cap is applied here, keeping tanh for d head / dx)
    if SOFTCAP:
        # tanh from its argument (rounding there moves 1 - tanh^2 by a relative ~|y| ulp),
        # not recovered from the capped z (an absolute ulp on tanh ~ 1 would swamp it)
        th, sech2 = tanh_and_sech2(z * (pre / inv_temp))
        z = (cap * inv_temp) * th
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    # The caller zeroes g at ignored rows and makes it NaN at out-of-range labels.
    g = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    dz = tl.where(cols[None, :] == labels[:, None], g[:, None], 0.0) - p * g[:, None]
    if HAS_ENT_GRAD:
        ge = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        dz -= ge[:, None] * p * (z - lse[:, None] + ent[:, None])
    mask = row_mask[:, None] & col_mask[None, :]
    out = dl_ptr + rows[:, None].to(tl.int64) * stride_dn + (cols - v_lo)[None, :]
    dz = dz * inv_temp
    if SOFTCAP:  # d x / d logits = scale * (1 - tanh^2), scale = cap * pre
        dz = dz * ((cap * pre) * sech2)
    tl.store(out, dz.to(dl_ptr.dtype.element_ty), mask=mask)


def _flags(hidden: torch.Tensor, precision: str | None = None) -> tuple[bool, str]:
    """(UPCAST, DOT_PRECISION). Every GEMM runs on tensor cores: bf16/fp16 natively;
    fp32 in TF32 when the user allows it for matmuls (as torch.mm does), otherwise in
    3xTF32 (split operands, three TF32 products: float32-level accuracy), never in an
    FMA loop. ``precision`` overrides the choice (ahead-of-time checks)."""
    upcast = interpreting() and hidden.dtype in (torch.bfloat16, torch.float16)
    if precision is None:
        precision = "tf32"
        if hidden.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
            precision = "tf32x3"
    return upcast, precision


def _splits_for(v: int, s: int) -> int:
    """The largest split count <= s whose aligned slices are all non-empty (the kernel
    derives the same slice width from the count)."""
    s = max(1, min(s, triton.cdiv(v, _SPLIT_ALIGN)))
    while True:
        width = triton.cdiv(triton.cdiv(v, s), _SPLIT_ALIGN) * _SPLIT_ALIGN
        if triton.cdiv(v, width) == s:
            return s
        s = triton.cdiv(v, width)


def num_splits(n: int, v: int, block_n: int, sms: int) -> int:
    """Vocabulary splits for ``block_n``-row tiles on ``sms`` SMs: at least two waves of
    programs, and among up to 4x that many splits the count that leaves the last wave
    fullest (at one resident program per SM, which the big tiles' shared memory forces)."""
    blocks = triton.cdiv(n, block_n)
    lo = _splits_for(v, triton.cdiv(2 * sms, blocks))
    best, best_eff = lo, 0.0
    for cand in range(lo, 4 * lo + 1):
        s = _splits_for(v, cand)
        programs = blocks * s
        eff = programs / (triton.cdiv(programs, sms) * sms)
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    inv_temp: float,
    vocab_size: int,
    with_entropy: bool,
    splits: int | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    *,
    sm_count: int | None = None,
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z[label] - lse, entropy or [0], lse), float32 [N], from hidden [N, H], weight [>=V, H].

    Expects rows with stride 1 along H and checked inputs. The first output is only
    meaningful where the label is in [0, vocab_size): the caller masks the others
    (``ignore_index`` -> 0, out of range -> NaN); no label is ever read out of bounds.
    ``splits`` forces the vocabulary split count (tests); by default it follows the
    tile the autotuner picks (``num_splits``). ``sm_count`` / ``precision`` override
    what the device and torch's TF32 flag would give (ahead-of-time checks).
    """
    n, h = hidden.shape
    v = vocab_size
    if splits is not None:
        count = lambda block_n: _splits_for(v, splits)
    elif hidden.device.type == "cuda" or sm_count is not None:
        if sm_count is None:
            sm_count = torch.cuda.get_device_properties(hidden.device).multi_processor_count
        count = lambda block_n: num_splits(n, v, block_n, sm_count)
    else:
        count = lambda block_n: _splits_for(v, 2)  # interpreter: exercise the merge cheaply
    # sized for the smallest tile (the most splits); unused splits are written neutral
    s_alloc = max(count(c.kwargs["BLOCK_N"]) for c in _all_configs())
    part = torch.empty((4, s_alloc, n), device=hidden.device, dtype=torch.float32)
    upcast, precision = _flags(hidden, precision)
    inv_temp, cap, pre, has_cap = head_args(inv_temp, softcap, logit_scale)
    if n > 0:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * count(meta["BLOCK_N"]),)
        with device_of(hidden):
            _fwd_kernel[grid](
                hidden, weight, bias if bias is not None else hidden, labels, part,
                n, _row_bucket(n), h, v, s_alloc, hidden.stride(0), weight.stride(0),
                inv_temp, cap, pre, HAS_BIAS=bias is not None, SOFTCAP=has_cap,
                WITH_ENTROPY=with_entropy,
                UPCAST=upcast, DOT_PRECISION=precision,
            )  # fmt: skip
    m, sum_e, sum_ez, y = part.unbind(0)  # each [S, N]
    big_m = m.amax(0)  # [N]
    scale = torch.exp(m - big_m)  # [S, N]
    total = (sum_e * scale).sum(0)
    lse = big_m + torch.log(total)
    label_z_minus_lse = y.sum(0) - lse  # caller masks ignored / out-of-range labels
    if with_entropy:
        # Every row gets its entropy, whatever its label (it does not need one).
        entropy = lse - (sum_ez * scale).sum(0) / total
    else:
        entropy = lse.new_empty(0)
    return label_z_minus_lse, entropy, lse


def linear_logprobs_dlogits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_temp: float,
    vocab_size: int,
    v_lo: int,
    v_hi: int,
    out: torch.Tensor,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    *,
    precision: str | None = None,
) -> torch.Tensor:
    """Write d(loss)/d(logits)[:, v_lo:v_hi] into ``out`` [N, >= v_hi - v_lo] and return it.

    ``grad_logprobs`` / ``grad_entropy`` are float32 [N]; ``grad_logprobs`` is already 0
    at ignored rows and NaN at out-of-range labels (so those rows' gradients are NaN);
    ``lse`` and ``entropy`` come from the forward.
    """
    n, h = hidden.shape
    assert out.stride(1) == 1 and out.shape[1] >= v_hi - v_lo
    upcast, precision = _flags(hidden, precision)
    has_ent = grad_entropy is not None
    inv_temp, cap, pre, has_cap = head_args(inv_temp, softcap, logit_scale)
    if n > 0 and v_hi > v_lo:
        grid = lambda meta: (
            triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v_hi - v_lo, meta["BLOCK_V"]),
        )
        with device_of(hidden):
            _dlogits_kernel[grid](
                hidden, weight, bias if bias is not None else hidden, labels, lse,
                entropy if has_ent else lse, grad_logprobs,
                grad_entropy if has_ent else grad_logprobs, out,
                n, _row_bucket(n), h, vocab_size, v_lo, v_hi, hidden.stride(0),
                weight.stride(0), out.stride(0), inv_temp, cap, pre, HAS_BIAS=bias is not None,
                SOFTCAP=has_cap, HAS_ENT_GRAD=has_ent, UPCAST=upcast, DOT_PRECISION=precision,
            )  # fmt: skip
    return out
