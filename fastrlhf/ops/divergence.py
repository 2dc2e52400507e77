"""``vocab_kl`` and ``linear_vocab_kl``: the per-token full-vocabulary KL between a policy
and a reference distribution, the second without ever holding either model's [N, V] logits.

Shapes: N = tokens (leading dims flattened), V = vocabulary, H = hidden size.

    z, z_r = logits / T, ref_logits / T;  p = softmax(z) (policy), q = softmax(z_r) (ref)
    "ref||policy":  KL(q || p) = E_q[z_r - z] - lse_r + lse,   dKL/dz = p - q
    "policy||ref":  KL(p || q) = E_p[z - z_r] - lse + lse_r,   dKL/dz = p * (log p - log q - KL)

Only the policy side gets gradients (the reference is a fixed target). The forward keeps
running maxima and sums of both distributions and the cross term E[z_a - z_b] under the
first argument's distribution (online log-sum-exps), so one pass reads each input once;
lse and lse_r survive for the backward, which recomputes the probabilities.

``vocab_kl`` (logits given) processes blocks of rows, full V each, so its temporaries stay
near a fixed size. ``linear_vocab_kl`` forms the logits itself from hidden states and the
lm_heads, ``raw = h @ W.T + b``, ``s = raw * logit_scale``, ``logits = softcap *
tanh(s / softcap)`` (when set), over blocks of Vb vocabulary columns, and recomputes
them in backward: dW[block] = dlogits.T @ h, dh += dlogits @ W[block]. Extra memory:
O(N * H) for dh plus a few [N, Vb] float32 blocks. The reference inputs may be the very
tensors of the policy (a LoRA reference with its adapter off shares the lm_head).

Backends (``impl=``): "torch" (the blocked paths above; also the "auto" choice on CUDA,
as no Triton kernel exists for these ops yet) and "reference"
(``fastrlhf.ops.reference.divergence``, which holds [N, V]).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastrlhf.ops._checks import (
    FLOAT_DTYPES,
    check_positive_float,
    check_same_device,
    check_tensor,
    describe,
)
from fastrlhf.ops._library import fused_op, resolve_impl
from fastrlhf.ops.reference.divergence import (
    DIRECTIONS,
    linear_vocab_kl_reference,
    vocab_kl_reference,
)

_IMPLS = ("auto", "torch", "reference")
# Elements of one block of float32 temporaries (16 MB each); a few are alive at once.
_BLOCK_ELEMS = 1 << 22


def _acc(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _pick_impl(op: str, impl: object, t: Tensor) -> str:
    # No Triton kernel yet: what resolve_impl would send to Triton runs the torch path.
    resolved = resolve_impl(op, impl, t, _IMPLS)
    return "torch" if resolved == "triton" else resolved


def _kl_from_logp(logp: Tensor, logq: Tensor, policy_first: bool) -> Tensor:
    if policy_first:
        return (logp.exp() * (logp - logq)).sum(-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def _dz(logp: Tensor, logq: Tensor, kl: Tensor, g: Tensor, policy_first: bool) -> Tensor:
    """g * dKL/dz for one block ([rows, cols]); logp, logq are full-vocabulary log-probs."""
    p = logp.exp()
    if policy_first:
        return p.mul_(logp.sub_(logq).sub_(kl[:, None])).mul_(g[:, None])
    return p.sub_(logq.exp_()).mul_(g[:, None])


# --------------------------------------------------------------------- vocab_kl op


def _vocab_kl_fake(logits, ref_logits, temperature, policy_first):
    n = logits.shape[0]
    return tuple(logits.new_empty((n,), dtype=_acc(logits)) for _ in range(3))


def _vocab_kl_backward(a, outputs, grads, needs):
    if not needs[0]:
        return [None]
    kl, lse, lse_r = outputs
    g = grads[0] if grads[0] is not None else torch.zeros_like(kl)
    g = g.to(kl.dtype) / a.temperature
    n, v = a.logits.shape
    out = torch.empty_like(a.logits)
    rows = max(1, _BLOCK_ELEMS // max(v, 1))
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        logp = a.logits[lo:hi].to(kl.dtype).div(a.temperature).sub_(lse[lo:hi, None])
        logq = a.ref_logits[lo:hi].to(kl.dtype).div(a.temperature).sub_(lse_r[lo:hi, None])
        out[lo:hi] = _dz(logp, logq, kl[lo:hi], g[lo:hi], a.policy_first)
    return [out]


@fused_op("vocab_kl", fake=_vocab_kl_fake, backward=_vocab_kl_backward, differentiable=("logits",))
def _vocab_kl_op(
    logits: Tensor, ref_logits: Tensor, temperature: float, policy_first: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(kl [N], lse [N], lse_r [N]) over blocks of rows."""
    n, v = logits.shape
    acc = _acc(logits)
    kl, lse, lse_r = (logits.new_empty((n,), dtype=acc) for _ in range(3))
    rows = max(1, _BLOCK_ELEMS // max(v, 1))
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        z = logits[lo:hi].to(acc).div(temperature)
        z_r = ref_logits[lo:hi].to(acc).div(temperature)
        lse[lo:hi] = torch.logsumexp(z, -1)
        lse_r[lo:hi] = torch.logsumexp(z_r, -1)
        logp, logq = z.sub_(lse[lo:hi, None]), z_r.sub_(lse_r[lo:hi, None])
        kl[lo:hi] = _kl_from_logp(logp, logq, policy_first)
    return kl, lse, lse_r


# --------------------------------------------------------------- linear_vocab_kl op


def _block(h, w, b, lo, hi, inv_temp, softcap, logit_scale):
    """(z [N, Vb] = logits / T, tanh or None) for vocabulary columns [lo, hi)."""
    acc = h.dtype
    s = h @ w[lo:hi].to(acc).t()
    if b is not None:
        s += b[lo:hi].to(acc)
    s.mul_(logit_scale)
    if softcap:
        t = s.div_(softcap).tanh_()
        return t * (softcap * inv_temp), t
    return s.mul_(inv_temp), None


def _linear_fake(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, temperature,
                 policy_first, softcap, logit_scale):  # fmt: skip
    n = hidden.shape[0]
    return tuple(hidden.new_empty((n,), dtype=_acc(hidden)) for _ in range(3))


def _linear_backward(a, outputs, grads, needs):
    need_h, need_w, need_b = needs
    kl, lse, lse_r = outputs
    acc = kl.dtype
    n, v = a.hidden.shape[0], a.weight.shape[0]
    inv_temp = 1.0 / a.temperature
    g = (grads[0] if grads[0] is not None else torch.zeros_like(kl)).to(acc)
    h, h_r = a.hidden.to(acc), a.ref_hidden.to(acc)
    dh = torch.zeros_like(h) if need_h else None
    dw = torch.empty_like(a.weight) if need_w else None
    db = torch.empty_like(a.bias) if need_b and a.bias is not None else None
    vb = max(1, min(v, _BLOCK_ELEMS // max(n, 1)))
    cap = (a.softcap, a.logit_scale)
    for lo in range(0, v, vb):
        hi = min(lo + vb, v)
        z, t = _block(h, a.weight, a.bias, lo, hi, inv_temp, *cap)
        z_r, _ = _block(h_r, a.ref_weight, a.ref_bias, lo, hi, inv_temp, *cap)
        dz = _dz(z.sub_(lse[:, None]), z_r.sub_(lse_r[:, None]), kl, g, a.policy_first)
        # chain rule back to raw = h @ W.T + b: d logits/d raw = logit_scale (1 - tanh^2)
        dz.mul_(inv_temp * a.logit_scale)
        if t is not None:
            dz.mul_(1.0 - t * t)
        if need_w:
            dw[lo:hi] = (dz.t() @ h).to(dw.dtype)
        if need_h:
            dh += dz @ a.weight[lo:hi].to(acc)
        if db is not None:
            db[lo:hi] = dz.sum(0).to(db.dtype)
    return [
        dh.to(a.hidden.dtype) if need_h else None,
        dw if need_w else None,
        db if need_b else None,
    ]


@fused_op(
    "linear_vocab_kl",
    fake=_linear_fake,
    backward=_linear_backward,
    differentiable=("hidden", "weight", "bias"),
)
def _linear_op(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    bias: Tensor | None,
    ref_bias: Tensor | None,
    temperature: float,
    policy_first: bool,
    softcap: float,
    logit_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(kl [N], lse [N], lse_r [N]) by online log-sum-exps over vocabulary blocks."""
    acc = _acc(hidden)
    n, v = hidden.shape[0], weight.shape[0]
    h, h_r = hidden.to(acc), ref_hidden.to(acc)
    inv_temp, cap = 1.0 / temperature, (softcap, logit_scale)
    m, m_r = (torch.full((n,), -math.inf, dtype=acc, device=hidden.device) for _ in range(2))
    s, s_r, cross = (torch.zeros((n,), dtype=acc, device=hidden.device) for _ in range(3))
    vb = max(1, min(v, _BLOCK_ELEMS // max(n, 1)))
    for lo in range(0, v, vb):
        hi = min(lo + vb, v)
        z, _ = _block(h, weight, bias, lo, hi, inv_temp, *cap)
        z_r, _ = _block(h_r, ref_weight, ref_bias, lo, hi, inv_temp, *cap)
        m_new, m_r_new = torch.maximum(m, z.amax(1)), torch.maximum(m_r, z_r.amax(1))
        scale, scale_r = torch.exp(m - m_new), torch.exp(m_r - m_r_new)
        e, e_r = torch.sub(z, m_new[:, None]).exp_(), torch.sub(z_r, m_r_new[:, None]).exp_()
        s, s_r = s * scale + e.sum(1), s_r * scale_r + e_r.sum(1)
        # cross = sum over the first argument's distribution (unnormalized) of z_a - z_b
        if policy_first:
            cross = cross * scale + (e * z.sub_(z_r)).sum(1)
        else:
            cross = cross * scale_r + (e_r * z_r.sub_(z)).sum(1)
        m, m_r = m_new, m_r_new
    lse, lse_r = m + torch.log(s), m_r + torch.log(s_r)
    if policy_first:
        kl = cross / s - lse + lse_r
    else:
        kl = cross / s_r - lse_r + lse
    return kl, lse, lse_r


# ---------------------------------------------------------------------- public API


def _check_common(temperature, direction, mask, lead: tuple, device) -> None:
    check_positive_float("temperature", temperature)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,))
        if tuple(mask.shape) != lead or mask.device != device:
            raise ValueError(
                f"mask must have shape {lead} on {device} (the tokens' shape); got {describe(mask)}"
            )


def _masked(kl: Tensor, mask: Tensor | None) -> Tensor:
    # where(), not a product: a masked position's KL and gradient are exactly 0
    return kl if mask is None else torch.where(mask, kl, torch.zeros_like(kl))


def vocab_kl(
    logits: Tensor,
    ref_logits: Tensor,
    *,
    temperature: float = 1.0,
    direction: str = "ref||policy",
    mask: Tensor | None = None,
    validate: bool = True,
    impl: str = "auto",
) -> Tensor:
    """Per-token full-vocabulary KL [...] (float32; float64 for float64 inputs).

    logits, ref_logits [..., V] of one dtype; ``direction`` "ref||policy" is
    KL(softmax(ref/T) || softmax(logits/T)), "policy||ref" the reverse. Differentiable in
    ``logits`` only. ``mask`` [...] bool: False positions get 0 and no gradient.
    ``validate=True`` also checks that both inputs are finite (one device sync).
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("ref_logits", ref_logits, dtypes=(logits.dtype,))
    check_same_device(logits=logits, ref_logits=ref_logits)
    if ref_logits.shape != logits.shape or logits.shape[-1] == 0:
        raise ValueError(
            f"ref_logits must have the shape of logits (non-empty last dim); got logits "
            f"{describe(logits)}, ref_logits {describe(ref_logits)}"
        )
    _check_common(temperature, direction, mask, tuple(logits.shape[:-1]), logits.device)
    impl = _pick_impl("vocab_kl", impl, logits)
    if validate:
        for name, t in (("logits", logits), ("ref_logits", ref_logits)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} has non-finite values; {describe(t)}")
    if impl == "reference":
        return vocab_kl_reference(logits, ref_logits, temperature, direction, mask)
    v = logits.shape[-1]
    x, x_r = logits.reshape(-1, v).contiguous(), ref_logits.detach().reshape(-1, v).contiguous()
    kl, _, _ = _vocab_kl_op(x, x_r, float(temperature), direction == "policy||ref")
    return _masked(kl.view(logits.shape[:-1]), mask)


def linear_vocab_kl(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    *,
    bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
    temperature: float = 1.0,
    direction: str = "ref||policy",
    mask: Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    validate: bool = True,
    impl: str = "auto",
) -> Tensor:
    """Per-token full-vocabulary KL [...] from hidden states [..., H] and lm_heads [V, H].

    The logits of each side are ``softcap * tanh(logit_scale * (h @ W.T + b) / softcap)``
    (without softcap: ``logit_scale * (h @ W.T + b)``), then as ``vocab_kl``. Gradients
    reach hidden, weight and bias, never the reference side, which may be the same
    tensors. ``validate=True`` checks that the hidden states are finite (one device sync).
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=1)
    dt = (hidden.dtype,)
    check_tensor("ref_hidden", ref_hidden, dtypes=dt)
    check_tensor("weight", weight, dtypes=dt, ndim=2)
    check_tensor("ref_weight", ref_weight, dtypes=dt, ndim=2)
    for name, b in (("bias", bias), ("ref_bias", ref_bias)):
        if b is not None:
            check_tensor(name, b, dtypes=dt, ndim=1)
    check_same_device(
        hidden=hidden, weight=weight, ref_hidden=ref_hidden, ref_weight=ref_weight,
        bias=bias, ref_bias=ref_bias,
    )  # fmt: skip
    h_dim = hidden.shape[-1]
    if ref_hidden.shape != hidden.shape:
        raise ValueError(
            f"ref_hidden must have the shape of hidden; got hidden {describe(hidden)}, "
            f"ref_hidden {describe(ref_hidden)}"
        )
    if weight.shape[1] != h_dim or ref_weight.shape != weight.shape or weight.shape[0] == 0:
        raise ValueError(
            f"weight and ref_weight must both be [V, H] with H = hidden.shape[-1] = {h_dim}; "
            f"got weight {describe(weight)}, ref_weight {describe(ref_weight)}"
        )
    for name, b in (("bias", bias), ("ref_bias", ref_bias)):
        if b is not None and b.shape[0] != weight.shape[0]:
            raise ValueError(f"{name} must be [V] with V = {weight.shape[0]}; got {describe(b)}")
    if softcap is not None:
        check_positive_float("softcap", softcap)
    check_positive_float("logit_scale", logit_scale)
    _check_common(temperature, direction, mask, tuple(hidden.shape[:-1]), hidden.device)
    impl = _pick_impl("linear_vocab_kl", impl, hidden)
    if validate:
        for name, t in (("hidden", hidden), ("ref_hidden", ref_hidden)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} has non-finite values; {describe(t)}")
    if impl == "reference":
        return linear_vocab_kl_reference(
            hidden, weight, ref_hidden, ref_weight, bias, ref_bias, temperature, direction,
            mask, softcap, logit_scale,
        )  # fmt: skip
    h = hidden.reshape(-1, h_dim).contiguous()
    h_r = ref_hidden.detach().reshape(-1, h_dim).contiguous()
    rb = ref_bias.detach().contiguous() if ref_bias is not None else None
    kl, _, _ = _linear_op(
        h, weight.contiguous(), h_r, ref_weight.detach().contiguous(),
        bias.contiguous() if bias is not None else None, rb, float(temperature),
        direction == "policy||ref", float(softcap or 0.0), float(logit_scale),
    )  # fmt: skip
    return _masked(kl.view(hidden.shape[:-1]), mask)
