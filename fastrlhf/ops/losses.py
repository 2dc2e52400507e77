"""RL losses: ``kl_penalty``, ``ppo_policy_loss``, ``value_loss`` (fused) and ``dpo_loss``.

Shapes: B = sequences, T = tokens per padded sequence, N = packed tokens, S = sequences
of a packed batch (``cu_seqlens`` [S + 1]), K = 16 statistics slots.

The formulas, the aggregations (``token-mean``, ``seq-mean-token-mean``,
``seq-mean-token-sum``; empty sequences are left out of sequence means) and the
metrics are those of ``fastrlhf.ops.reference.losses``, which the tests compare with.

Paths (per call): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1, run the Triton
kernels of ``fastrlhf.kernels.losses`` -- for ppo_policy_loss and value_loss one launch
forward and one backward, which return the loss and every metric in one [K] tensor
(no host sync). Other CPU tensors, and float64 anywhere (gradcheck), run a vectorised
PyTorch implementation of the same statistics, whose extra memory is a few [N] vectors.

The fused ops are ``torch.library.custom_op``s with registered fakes and backwards, so
``torch.compile(fullgraph=True)`` traces them. Gradients flow to ``logp`` / ``values``
and to ``entropy``; old_logp, advantages, ref_logp (in ppo_policy_loss), old_values,
returns and masks are treated as constants. ``kl_penalty`` differentiates both inputs.

``dpo_loss`` works on [B] sequence-level log-probs, so it is plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrlhf.ops._checks import FLOAT_DTYPES, INDEX_DTYPES, check_same_device, check_tensor
from fastrlhf.ops.reference.losses import AGGS, DPO_KINDS, KL_KINDS

K = 16
_MAXCOL = 8
_PPO_METRICS = {
    "clip_frac": 5,
    "approx_kl": 6,
    "ratio_mean": 7,
    "ratio_max": 8,
    "kl": 9,
    "entropy": 10,
    "dual_clip_frac": 11,
    "pg_loss": 12,
}
_VALUE_METRICS = {"clip_frac": 5, "values_mean": 6, "mse": 7, "values_max": 8}
_KL_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
_AGG_CODES = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2}


def _use_triton(t: torch.Tensor) -> bool:
    if t.dtype == torch.float64:
        return False
    if t.is_cuda:
        return True
    import triton

    return triton.knobs.runtime.interpret


def _split_kind(kind: str) -> tuple[int, bool]:
    st = kind.endswith("+st")
    return _KL_CODES[kind[:-3] if st else kind], st


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


# ---------------------------------------------------------------------------------------
# kl_penalty


def _torch_kl(x, r, kind: str):
    """(value, d value / d x) in PyTorch; mirrors kernels.losses._kl_value_grad."""
    code, st = _split_kind(kind)
    diff = x - r
    if code == 0:
        value, grad = diff, torch.ones_like(diff)
    elif code == 1:
        value, grad = diff.abs(), diff.sign()
    elif code == 2:
        value, grad = 0.5 * diff * diff, diff
    else:
        d_raw = -diff
        d = d_raw.clamp(-20.0, 20.0)
        e = d.exp()
        raw = e - d - 1.0
        value = raw.clamp(-10.0, 10.0)
        passes = (d_raw >= -20) & (d_raw <= 20) & (raw >= -10) & (raw <= 10)
        grad = torch.where(passes, 1.0 - e, 0.0)
    return value, (diff if st else grad)


@torch.library.custom_op("fastrlhf::kl_penalty", mutates_args=())
def _kl_op(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    if _use_triton(logp):
        from fastrlhf.kernels.losses import kl_penalty_fwd

        code, st = _split_kind(kind)
        return kl_penalty_fwd(logp, ref_logp, code, st)
    dt = _compute_dtype(logp)
    return _torch_kl(logp.to(dt), ref_logp.to(dt), kind)[0]


@_kl_op.register_fake
def _(logp, ref_logp, kind):
    return logp.new_empty(logp.shape, dtype=_compute_dtype(logp))


@torch.library.custom_op("fastrlhf::kl_penalty_bwd", mutates_args=())
def _kl_bwd_op(
    logp: torch.Tensor, ref_logp: torch.Tensor, grad: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(logp):
        from fastrlhf.kernels.losses import kl_penalty_bwd

        code, st = _split_kind(kind)
        return kl_penalty_bwd(logp, ref_logp, grad.contiguous(), code, st)
    dt = _compute_dtype(logp)
    g = grad.to(dt) * _torch_kl(logp.to(dt), ref_logp.to(dt), kind)[1]
    return g.to(logp.dtype), (-g).to(ref_logp.dtype)


@_kl_bwd_op.register_fake
def _(logp, ref_logp, grad, kind):
    return torch.empty_like(logp), torch.empty_like(ref_logp)


def _kl_setup(ctx, inputs, output):
    logp, ref_logp, kind = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.kind = kind


def _kl_backward(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    d_logp, d_ref = _kl_bwd_op(logp, ref_logp, grad, ctx.kind)
    return d_logp, d_ref, None


_kl_op.register_autograd(_kl_backward, setup_context=_kl_setup)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate between the policy (logp) and a reference (ref_logp).

    kind: ``k1`` logp - ref; ``abs`` |logp - ref|; ``k2`` (logp - ref)^2 / 2; ``k3``
    exp(d) - d - 1 with d = ref - logp clamped to +-20 and the value clamped to +-10.
    Straight-through variants ``k1+st``, ``abs+st``, ``k2+st``, ``k3+st`` return the value
    of the named estimator with the gradient of k2 (logp - ref), the unbiased gradient
    of KL(policy || ref) when used as a loss.

    Returns float32 (float64 for float64 inputs), shaped like logp; differentiable in
    both inputs.
    """
    check_tensor("logp", logp, dtypes=FLOAT_DTYPES)
    check_tensor("ref_logp", ref_logp, dtypes=FLOAT_DTYPES)
    _check_shapes(logp=logp, ref_logp=ref_logp)
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}; got {kind!r}")
    shape = logp.shape
    out = _kl_op(logp.reshape(-1).contiguous(), ref_logp.reshape(-1).contiguous(), kind)
    return out.view(shape)


# ---------------------------------------------------------------------------------------
# shared: validation, sequence layout, the PyTorch statistics path


def _check_shapes(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.shape != first.shape:
            raise ValueError(
                f"{name} must have the shape of {first_name} {tuple(first.shape)}; got "
                f"{name} shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
            )
    check_same_device(**present)


def _layout(x: torch.Tensor, cu_seqlens: torch.Tensor | None, name: str) -> tuple[int, int]:
    """(T, S): sequence length for padded [B, T] inputs (0 when packed), sequence count."""
    if cu_seqlens is None:
        if x.dim() != 2:
            raise ValueError(
                f"{name} must be [B, T] (or packed [N] with cu_seqlens); got shape "
                f"{tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
            )
        return int(x.shape[1]), int(x.shape[0])
    check_tensor("cu_seqlens", cu_seqlens, dtypes=INDEX_DTYPES, ndim=1)
    if x.dim() != 1:
        raise ValueError(
            f"with cu_seqlens, {name} must be packed [N]; got shape {tuple(x.shape)}, "
            f"dtype {x.dtype}, device {x.device}"
        )
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must have at least one element ([S + 1] offsets)")
    if cu_seqlens.device != x.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {name} is on {x.device}")
    return 0, int(cu_seqlens.numel()) - 1


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)  # the kernels load masks as bytes
    return t.contiguous()


def _check_agg(agg: str) -> int:
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {AGGS}; got {agg!r}")
    return _AGG_CODES[agg]


def _seq_ids(n: int, t: int, s: int, cu: torch.Tensor | None, device) -> torch.Tensor:
    """Sequence of every token, S for tokens outside every sequence (a dump bucket)."""
    pos = torch.arange(n, device=device)
    if cu is None:
        return pos // max(t, 1)
    cu = cu.long()
    ids = torch.searchsorted(cu, pos, right=True) - 1
    inside = (pos >= cu[0]) & (pos < cu[-1])
    return torch.where(inside, ids, s)


def _torch_stats(loss, m, metrics: dict[int, torch.Tensor], ids, s: int, agg: int):
    """(stats [K], partials [S, K]) exactly as the kernels lay them out."""
    dt = loss.dtype
    keep = (m != 0) & (ids < s)
    mw = torch.where(keep, m, 0.0)
    cols = torch.zeros(s + 1, K, dtype=dt, device=loss.device)
    add = lambda j, v: cols[:, j].index_add_(0, ids, torch.where(keep, v, 0.0) * mw)
    add(0, loss)
    cols[:, 1].index_add_(0, ids, mw)
    for j, v in metrics.items():
        if j == _MAXCOL:
            vals = torch.where(keep, v, float("-inf"))
            cols[:, j] = float("-inf")
            cols[:, j].scatter_reduce_(0, ids, vals, "amax")
        else:
            add(j, v.to(dt))
    partials = cols[:s]
    cnt = partials[:, 1]
    nonempty = cnt > 0
    partials[:, 2] = torch.where(nonempty, partials[:, 0] / torch.where(nonempty, cnt, 1.0), 0.0)
    partials[:, 3] = torch.where(nonempty, partials[:, 0], 0.0)
    partials[:, 4] = nonempty.to(dt)
    total = partials.sum(0)
    count, n_seq = total[1], total[4]
    num, den = [(total[0], count), (total[2], n_seq), (total[3], n_seq)][agg]
    stats = total / torch.where(count > 0, count, 1.0)
    stats[:5] = total[:5]
    stats[0] = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    if _MAXCOL in metrics and s > 0:
        stats[_MAXCOL] = torch.where(count > 0, partials[:, _MAXCOL].max(), 0.0)
    else:
        stats[_MAXCOL] = 0.0
    return stats, partials


def _torch_weight(grad, stats, partials, ids, s: int, agg: int) -> torch.Tensor:
    """Per-token d loss / d (m l), as kernels.losses._agg_weight."""
    g = grad[0]
    den = stats[1] if agg == 0 else stats[4]
    w = torch.where(den > 0, g / torch.where(den > 0, den, 1.0), 0.0)
    w = w.expand(ids.shape)
    if agg == 1:
        cnt = torch.cat([partials[:, 1], partials.new_zeros(1)])[ids]
        w = torch.where(cnt > 0, w / torch.where(cnt > 0, cnt, 1.0), 0.0)
    return torch.where(ids < s, w, 0.0)


def _metrics(stats: torch.Tensor, names: dict[str, int]) -> dict[str, torch.Tensor]:
    stats = stats.detach()
    return {name: stats[j] for name, j in names.items()}


# ---------------------------------------------------------------------------------------
# ppo_policy_loss


def _torch_ppo_token(x, o, a, clip_lo, clip_hi, dual_clip):
    raw = x - o
    log_ratio = raw.clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    pg1 = -a * ratio
    pg2 = -a * ratio.clamp(1.0 - clip_lo, 1.0 + clip_hi)
    grad = torch.where((pg1 >= pg2) & (raw >= -20) & (raw <= 20), pg1, 0.0)
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    dual = torch.zeros_like(clipped)
    if dual_clip is not None:
        pg3 = -a * dual_clip
        dual = (a < 0) & (pg > pg3)
        pg = torch.where(dual, pg3, pg)
        grad = torch.where(dual, 0.0, grad)
    return pg, grad, ratio, log_ratio, clipped, dual


@torch.library.custom_op("fastrlhf::ppo_policy_loss_fwd", mutates_args=())
def _ppo_fwd_op(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    entropy: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    seq_len: int,
    num_seqs: int,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    kl_kind: str,
    entropy_coef: float,
    agg: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(logp):
        from fastrlhf.kernels.losses import ppo_fwd

        code, st = _split_kind(kl_kind)
        return ppo_fwd(logp, old_logp, advantages, mask, ref_logp, entropy, cu_seqlens, seq_len,
                       num_seqs, clip_low, clip_high, dual_clip, kl_coef, code, st, entropy_coef,
                       agg)  # fmt: skip
    dt = _compute_dtype(logp)
    x, o, a = logp.to(dt), old_logp.to(dt), advantages.to(dt)
    pg, _, ratio, log_ratio, clipped, dual = _torch_ppo_token(
        x, o, a, clip_low, clip_high, dual_clip
    )
    loss = pg
    metrics = {5: clipped, 6: ratio - 1.0 - log_ratio, 7: ratio, 8: ratio, 11: dual, 12: pg}
    if ref_logp is not None:
        kl = _torch_kl(x, ref_logp.to(dt), kl_kind)[0]
        loss = loss + kl_coef * kl
        metrics[9] = kl
    if entropy is not None:
        loss = loss - entropy_coef * entropy.to(dt)
        metrics[10] = entropy.to(dt)
    ids = _seq_ids(x.numel(), seq_len, num_seqs, cu_seqlens, x.device)
    return _torch_stats(loss, mask.to(dt), metrics, ids, num_seqs, agg)


@_ppo_fwd_op.register_fake
def _(logp, old_logp, advantages, mask, ref_logp, entropy, cu_seqlens, seq_len, num_seqs, *args):
    dt = _compute_dtype(logp)
    return logp.new_empty(K, dtype=dt), logp.new_empty((num_seqs, K), dtype=dt)


@torch.library.custom_op("fastrlhf::ppo_policy_loss_bwd", mutates_args=())
def _ppo_bwd_op(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    partials: torch.Tensor,
    stats: torch.Tensor,
    grad: torch.Tensor,
    seq_len: int,
    num_seqs: int,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    kl_kind: str,
    entropy_coef: float,
    want_dentropy: bool,
    agg: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(logp):
        from fastrlhf.kernels.losses import ppo_bwd

        code, st = _split_kind(kl_kind)
        d_logp, d_ent = ppo_bwd(logp, old_logp, advantages, mask, ref_logp, cu_seqlens, partials,
                                stats, grad.contiguous(), seq_len, num_seqs, clip_low, clip_high,
                                dual_clip, kl_coef, code, st, entropy_coef, want_dentropy,
                                agg)  # fmt: skip
        return d_logp, d_ent if d_ent is not None else logp.new_empty(0, dtype=torch.float32)
    dt = _compute_dtype(logp)
    x, o, a = logp.to(dt), old_logp.to(dt), advantages.to(dt)
    _, dl, *_ = _torch_ppo_token(x, o, a, clip_low, clip_high, dual_clip)
    if ref_logp is not None:
        dl = dl + kl_coef * _torch_kl(x, ref_logp.to(dt), kl_kind)[1]
    ids = _seq_ids(x.numel(), seq_len, num_seqs, cu_seqlens, x.device)
    m = mask.to(dt)
    scale = torch.where(
        m != 0, m * _torch_weight(grad.to(dt), stats, partials, ids, num_seqs, agg), 0.0
    )
    d_ent = (-entropy_coef * scale) if want_dentropy else logp.new_empty(0, dtype=dt)
    return (dl * scale).to(logp.dtype), d_ent


@_ppo_bwd_op.register_fake
def _(logp, old_logp, advantages, mask, ref_logp, cu_seqlens, partials, stats, grad, seq_len,
      num_seqs, clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef, want_dentropy,
      agg):  # fmt: skip
    n = logp.numel() if want_dentropy else 0
    return torch.empty_like(logp), logp.new_empty(n, dtype=_compute_dtype(logp))


def _ppo_setup(ctx, inputs, output):
    logp, old_logp, advantages, mask, ref_logp, entropy, cu_seqlens = inputs[:7]
    stats, partials = output
    ctx.save_for_backward(logp, old_logp, advantages, mask, ref_logp, cu_seqlens, partials, stats)
    ctx.args = inputs[7:]
    ctx.has_entropy = entropy is not None
    ctx.entropy_dtype = entropy.dtype if entropy is not None else None
    ctx.mark_non_differentiable(partials)
    ctx.set_materialize_grads(False)  # no [S, K] zero gradient for the partials


def _ppo_backward(ctx, grad_stats, grad_partials):
    if grad_stats is None:
        return (None,) * 16
    logp, old_logp, advantages, mask, ref_logp, cu_seqlens, partials, stats = ctx.saved_tensors
    seq_len, num_seqs, clip_lo, clip_hi, dual, kl_coef, kl_kind, ent_coef, agg = ctx.args
    d_logp, d_ent = _ppo_bwd_op(logp, old_logp, advantages, mask, ref_logp, cu_seqlens, partials,
                                stats, grad_stats, seq_len, num_seqs, clip_lo, clip_hi, dual,
                                kl_coef, kl_kind, ent_coef, ctx.has_entropy, agg)  # fmt: skip
    d_ent = d_ent.to(ctx.entropy_dtype) if ctx.has_entropy else None
    return (d_logp, None, None, None, None, d_ent) + (None,) * 10


_ppo_fwd_op.register_autograd(_ppo_backward, setup_context=_ppo_setup)


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    agg: str = "token-mean",
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO policy loss with KL and entropy terms, fused; returns (loss, metrics).

    Per token, with r = exp(clamp(logp - old_logp, -20, 20)) and A = advantages:
        pg = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high))
        pg = min(pg, -A dual_clip)  where A < 0 (dual-clip, if given; must be > 1)
        l  = pg + kl_coef * kl_penalty(logp, ref_logp, kl_kind) - entropy_coef * entropy
    aggregated over ``mask`` by ``agg`` (see the module docstring).

    Inputs are [B, T] (sequences are rows), or packed [N] with ``cu_seqlens`` [S + 1].
    mask: bool or float weights. Metrics (0-dim, detached, on the device; no sync):
    clip_frac, dual_clip_frac, approx_kl (token mean of r - 1 - log r, an estimate of
    KL(old || new)), ratio_mean, ratio_max, pg_loss, and kl / entropy when given.
    """
    check_tensor("logp", logp, dtypes=FLOAT_DTYPES)
    for name, t in (("old_logp", old_logp), ("advantages", advantages)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES)
    check_tensor("mask", mask)
    for name, t in (("ref_logp", ref_logp), ("entropy", entropy)):
        if t is not None:
            check_tensor(name, t, dtypes=FLOAT_DTYPES)
    _check_shapes(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask,
                  ref_logp=ref_logp, entropy=entropy)  # fmt: skip
    seq_len, num_seqs = _layout(logp, cu_seqlens, "logp")
    agg_code = _check_agg(agg)
    if kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind must be one of {KL_KINDS}; got {kl_kind!r}")
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp; got ref_logp=None")
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0; got {clip_low}, {clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None); got {dual_clip}")
    stats, _ = _ppo_fwd_op(
        _flat(logp), _flat(old_logp), _flat(advantages), _flat(mask), _flat(ref_logp),
        _flat(entropy), _flat(cu_seqlens), seq_len, num_seqs, float(clip_low), float(clip_high),
        None if dual_clip is None else float(dual_clip), float(kl_coef), kl_kind,
        float(entropy_coef), agg_code,
    )  # fmt: skip
    names = dict(_PPO_METRICS)
    if ref_logp is None:
        names.pop("kl")
    if entropy is None:
        names.pop("entropy")
    return stats[0], _metrics(stats, names)


# ---------------------------------------------------------------------------------------
# value_loss


def _torch_value_token(v, ov, ret, clip):
    err = v - ret
    l1 = err * err
    if clip is None:
        return 0.5 * l1, err, torch.zeros_like(l1, dtype=torch.bool), l1
    dv = v - ov
    err2 = ov + dv.clamp(-clip, clip) - ret
    l2 = err2 * err2
    use2 = l2 > l1
    grad = torch.where(use2, torch.where((dv >= -clip) & (dv <= clip), err2, 0.0), err)
    return 0.5 * torch.maximum(l1, l2), grad, use2, l1


@torch.library.custom_op("fastrlhf::value_loss_fwd", mutates_args=())
def _value_fwd_op(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    seq_len: int,
    num_seqs: int,
    clip: float | None,
    agg: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(values):
        from fastrlhf.kernels.losses import value_fwd

        return value_fwd(
            values, old_values, returns, mask, cu_seqlens, seq_len, num_seqs, clip, agg
        )
    dt = _compute_dtype(values)
    v = values.to(dt)
    loss, _, clipped, l1 = _torch_value_token(v, old_values.to(dt), returns.to(dt), clip)
    metrics = {5: clipped, 6: v, 7: l1, 8: v}
    ids = _seq_ids(v.numel(), seq_len, num_seqs, cu_seqlens, v.device)
    return _torch_stats(loss, mask.to(dt), metrics, ids, num_seqs, agg)


@_value_fwd_op.register_fake
def _(values, old_values, returns, mask, cu_seqlens, seq_len, num_seqs, clip, agg):
    dt = _compute_dtype(values)
    return values.new_empty(K, dtype=dt), values.new_empty((num_seqs, K), dtype=dt)


@torch.library.custom_op("fastrlhf::value_loss_bwd", mutates_args=())
def _value_bwd_op(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    partials: torch.Tensor,
    stats: torch.Tensor,
    grad: torch.Tensor,
    seq_len: int,
    num_seqs: int,
    clip: float | None,
    agg: int,
) -> torch.Tensor:
    if _use_triton(values):
        from fastrlhf.kernels.losses import value_bwd

        return value_bwd(values, old_values, returns, mask, cu_seqlens, partials, stats,
                         grad.contiguous(), seq_len, num_seqs, clip, agg)  # fmt: skip
    dt = _compute_dtype(values)
    _, dl, _, _ = _torch_value_token(values.to(dt), old_values.to(dt), returns.to(dt), clip)
    ids = _seq_ids(values.numel(), seq_len, num_seqs, cu_seqlens, values.device)
    m = mask.to(dt)
    w = _torch_weight(grad.to(dt), stats, partials, ids, num_seqs, agg)
    return (dl * torch.where(m != 0, m * w, 0.0)).to(values.dtype)


@_value_bwd_op.register_fake
def _(values, old_values, returns, mask, cu_seqlens, partials, stats, grad, *args):
    return torch.empty_like(values)


def _value_setup(ctx, inputs, output):
    values, old_values, returns, mask, cu_seqlens = inputs[:5]
    stats, partials = output
    ctx.save_for_backward(values, old_values, returns, mask, cu_seqlens, partials, stats)
    ctx.args = inputs[5:]
    ctx.mark_non_differentiable(partials)
    ctx.set_materialize_grads(False)  # no [S, K] zero gradient for the partials


def _value_backward(ctx, grad_stats, grad_partials):
    if grad_stats is None:
        return (None,) * 9
    values, old_values, returns, mask, cu_seqlens, partials, stats = ctx.saved_tensors
    seq_len, num_seqs, clip, agg = ctx.args
    d_values = _value_bwd_op(values, old_values, returns, mask, cu_seqlens, partials, stats,
                             grad_stats, seq_len, num_seqs, clip, agg)  # fmt: skip
    return (d_values,) + (None,) * 8


_value_fwd_op.register_autograd(_value_backward, setup_context=_value_setup)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((v - R)^2, (old + clamp(v - old, +-clip) - R)^2), fused.

    ``clip=None`` gives the plain 0.5 * (v - R)^2. Same layouts and ``agg`` as
    ppo_policy_loss. Metrics (detached, no sync): clip_frac (tokens where the clipped
    term is the larger), values_mean, values_max, mse (token mean of (v - R)^2).
    """
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES)
    check_tensor("mask", mask)
    _check_shapes(values=values, old_values=old_values, returns=returns, mask=mask)
    seq_len, num_seqs = _layout(values, cu_seqlens, "values")
    agg_code = _check_agg(agg)
    if clip is not None and not clip >= 0:
        raise ValueError(f"clip must be >= 0 (or None); got {clip}")
    stats, _ = _value_fwd_op(
        _flat(values), _flat(old_values), _flat(returns), _flat(mask), _flat(cu_seqlens), seq_len,
        num_seqs, None if clip is None else float(clip), agg_code,
    )  # fmt: skip
    return stats[0], _metrics(stats, _VALUE_METRICS)


# ---------------------------------------------------------------------------------------
# dpo_loss


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor | None = None,
    ref_rejected_logp: torch.Tensor | None = None,
    beta: float = 0.1,
    kind: str = "sigmoid",
    *,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Preference loss over a batch of [B] summed response log-probs; returns (loss, metrics).

    With h = (pc - rc) - (pr - rr) (policy / reference, chosen / rejected):
        sigmoid: -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)   (eps =
                 label_smoothing; conservative DPO)
        ipo:     (h - 1 / (2 beta))^2       (pass length-averaged log-probs for the paper's
                 form)
        hinge:   relu(1 - beta h)
    Reference-free kinds use length-normalised log-probs a = logp / lengths:
        simpo:   -(1 - eps) logsigmoid(beta (a_c - a_r) - gamma) - eps logsigmoid(-(...))
        orpo:    -a_c + beta * -logsigmoid(log odds(a_c) - log odds(a_r)), with
                 log odds(a) = a - log(1 - e^a); -a_c is the chosen response's
                 per-token NLL and beta plays ORPO's lambda.
    The loss is the batch mean. Metrics (detached batch means): chosen_rewards,
    rejected_rewards (beta * (policy - ref), or beta * a for simpo/orpo),
    reward_accuracy, margins.
    """
    if kind not in DPO_KINDS:
        raise ValueError(f"kind must be one of {DPO_KINDS}; got {kind!r}")
    check_tensor("policy_chosen_logp", policy_chosen_logp, dtypes=FLOAT_DTYPES, ndim=1)
    check_tensor("policy_rejected_logp", policy_rejected_logp, dtypes=FLOAT_DTYPES, ndim=1)
    ref_free = kind in ("simpo", "orpo")
    if ref_free:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(
                f"kind={kind!r} normalises by length: pass chosen_lengths and rejected_lengths "
                "(token counts of each response)"
            )
        check_tensor("chosen_lengths", chosen_lengths)
        check_tensor("rejected_lengths", rejected_lengths)
    else:
        for name, t in (("ref_chosen_logp", ref_chosen_logp),
                        ("ref_rejected_logp", ref_rejected_logp)):  # fmt: skip
            if t is None:
                raise ValueError(
                    f"kind={kind!r} needs {name} (only simpo and orpo are reference-free)"
                )
            check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=1)
    _check_shapes(policy_chosen_logp=policy_chosen_logp, policy_rejected_logp=policy_rejected_logp,
                  ref_chosen_logp=None if ref_free else ref_chosen_logp,
                  ref_rejected_logp=None if ref_free else ref_rejected_logp,
                  chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)  # fmt: skip
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")

    eps = label_smoothing
    smoothed = lambda z: -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if ref_free:
        avg_c = policy_chosen_logp / chosen_lengths.to(policy_chosen_logp.dtype)
        avg_r = policy_rejected_logp / rejected_lengths.to(policy_rejected_logp.dtype)
        chosen_r, rejected_r = beta * avg_c, beta * avg_r
        if kind == "simpo":
            losses = smoothed(beta * (avg_c - avg_r) - gamma)
        else:
            # log(1 - e^a) via expm1 stays accurate as a -> 0 (probabilities near 1).
            log_odds = (avg_c - avg_r) - (
                torch.log(-torch.expm1(avg_c)) - torch.log(-torch.expm1(avg_r))
            )
            losses = -avg_c - beta * F.logsigmoid(log_odds)
    else:
        chosen_r = beta * (policy_chosen_logp - ref_chosen_logp)
        rejected_r = beta * (policy_rejected_logp - ref_rejected_logp)
        h = (policy_chosen_logp - ref_chosen_logp) - (policy_rejected_logp - ref_rejected_logp)
        if kind == "sigmoid":
            losses = smoothed(beta * h)
        elif kind == "ipo":
            losses = (h - 1.0 / (2.0 * beta)).square()
        else:
            losses = F.relu(1.0 - beta * h)
    chosen_r, rejected_r = chosen_r.detach(), rejected_r.detach()
    metrics = {
        "chosen_rewards": chosen_r.mean(),
        "rejected_rewards": rejected_r.mean(),
        "reward_accuracy": (chosen_r > rejected_r).to(chosen_r.dtype).mean(),
        "margins": (chosen_r - rejected_r).mean(),
    }
    return losses.mean(), metrics
