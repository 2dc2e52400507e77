"""RL losses: ``kl_penalty``, ``ppo_policy_loss``, ``value_loss`` (fused) and ``dpo_loss``.

Shapes: B = sequences, T = tokens per padded sequence, N = packed tokens, S = sequences
of a packed batch (``cu_seqlens`` [S + 1]).

The formulas, the aggregations (``token-mean``, ``seq-mean-token-mean``,
``seq-mean-token-sum``; empty sequences are left out of sequence means) and the
metrics are those of ``fastrlhf.ops.reference.losses``.

Backends (``impl=``, see ``fastrlhf.ops._library.resolve_impl``): "triton" runs the
kernels of ``fastrlhf.kernels.losses`` -- for ppo_policy_loss and value_loss one launch
forward and one backward, returning the loss and every metric in one [16] tensor (no
host sync) -- registered as ``fastrlhf::`` ops, so ``torch.compile(fullgraph=True)``
traces them. "torch" and "reference" run the reference (elementwise PyTorch, a few [N]
temporaries, no host sync), on inputs upcast to float32 at least; "auto" is Triton
for CUDA tensors and the reference otherwise. Gradients flow to ``logp`` / ``values``
and to ``entropy``; old_logp, advantages, ref_logp (in ppo_policy_loss), old_values,
returns and masks are constants. ``kl_penalty`` differentiates both inputs.

Packed inputs: ``validate=True`` (the default) checks ``cu_seqlens`` like packed_gae
(starts at 0, never decreases, ends at N; one host sync on CUDA). Without it a bad
layout gives wrong numbers but never an out-of-bounds access.

``dpo_loss`` works on [B] sequence-level log-probs, so it is plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrlhf.ops._checks import (
    AGGS,
    DPO_KINDS,
    FLOAT_DTYPES,
    INDEX_DTYPES,
    KL_KINDS,
    check_packed_layout,
    check_same_device,
    check_tensor,
)
from fastrlhf.ops._library import fused_op, resolve_impl
from fastrlhf.ops.reference.losses import (
    kl_penalty_reference,
    ppo_policy_loss_reference,
    value_loss_reference,
)

_KL_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
_AGG_CODES = {agg: i for i, agg in enumerate(AGGS)}


def _kl_code(kind: str) -> tuple[int, bool]:
    st = kind.endswith("+st")
    return _KL_CODES[kind[:-3] if st else kind], st


def _upcast(t: torch.Tensor | None) -> torch.Tensor | None:
    """The reference path computes in float32 at least (differentiable)."""
    return None if t is None else t.to(torch.promote_types(t.dtype, torch.float32))


# ---------------------------------------------------------------------------------------
# kl_penalty


def _kl_backward(a, outputs, grads, needs):
    from fastrlhf.kernels.losses import kl_penalty_bwd

    d_logp, d_ref = kl_penalty_bwd(a.logp, a.ref_logp, grads[0].contiguous(), *_kl_code(a.kind))
    return [d_logp, d_ref]


@fused_op(
    "kl_penalty",
    fake=lambda logp, ref_logp, kind: torch.empty_like(logp, dtype=torch.float32),
    backward=_kl_backward,
    differentiable=("logp", "ref_logp"),
)
def _kl_op(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    from fastrlhf.kernels.losses import kl_penalty_fwd

    return kl_penalty_fwd(logp, ref_logp, *_kl_code(kind))


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3", *, impl: str = "auto"
) -> torch.Tensor:
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
    if resolve_impl("kl_penalty", impl, logp) != "triton":
        return kl_penalty_reference(_upcast(logp), _upcast(ref_logp), kind)
    out = _kl_op(logp.reshape(-1).contiguous(), ref_logp.reshape(-1).contiguous(), kind)
    return out.view(logp.shape)


# ---------------------------------------------------------------------------------------
# shared: validation and the packed layout


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


def _layout(
    op: str, x: torch.Tensor, cu_seqlens: torch.Tensor | None, name: str, validate: bool
) -> tuple[int, int]:
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
        raise ValueError(f"{op}: cu_seqlens must be 1-D [B+1] with B >= 0; got an empty tensor")
    if cu_seqlens.device != x.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {name} is on {x.device}")
    if validate:
        check_packed_layout(op, cu_seqlens, x.numel(), name)
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


def _stats_fake(like: torch.Tensor, num_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(stats [16], partials [S, 16]), float32 whatever the inputs' dtype."""
    return like.new_empty(16, dtype=torch.float32), like.new_empty(
        (num_seqs, 16), dtype=torch.float32
    )


def _loss_grad(grads, stats: torch.Tensor) -> torch.Tensor:
    return (grads[0] if grads[0] is not None else torch.zeros_like(stats)).contiguous()


# ---------------------------------------------------------------------------------------
# ppo_policy_loss


def _ppo_backward(a, outputs, grads, needs):
    from fastrlhf.kernels.losses import ppo_bwd

    stats, partials = outputs
    d_logp, d_ent = ppo_bwd(
        a.logp, a.old_logp, a.advantages, a.mask, a.ref_logp, a.cu_seqlens, partials, stats,
        _loss_grad(grads, stats), a.seq_len, a.num_seqs, a.clip_low, a.clip_high, a.dual_clip,
        a.kl_coef, *_kl_code(a.kl_kind), a.entropy_coef, needs[1] and a.entropy is not None,
        a.agg,
    )  # fmt: skip
    return [d_logp, None if d_ent is None else d_ent.to(a.entropy.dtype)]


@fused_op(
    "ppo_policy_loss",
    fake=lambda logp, old, adv, mask, ref, ent, cu, seq_len, num_seqs, *_: _stats_fake(
        logp, num_seqs
    ),
    backward=_ppo_backward,
    differentiable=("logp", "entropy"),
)
def _ppo_op(
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
    from fastrlhf.kernels.losses import ppo_fwd

    code, st = _kl_code(kl_kind)
    return ppo_fwd(logp, old_logp, advantages, mask, ref_logp, entropy, cu_seqlens, seq_len,
                   num_seqs, clip_low, clip_high, dual_clip, kl_coef, code, st, entropy_coef,
                   agg)  # fmt: skip


def _metrics(stats: torch.Tensor, slots: dict[str, int], drop=()) -> dict[str, torch.Tensor]:
    stats = stats.detach()
    return {name: stats[j] for name, j in slots.items() if name not in drop}


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
    validate: bool = True,
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO policy loss with KL and entropy terms, fused; returns (loss, metrics).

    Per token, with r = exp(clamp(logp - old_logp, -20, 20)) and A = advantages:
        pg = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high))
        pg = min(pg, -A dual_clip)  where A < 0 (dual-clip, if given; must be > 1)
        l  = pg + kl_coef * kl_penalty(logp, ref_logp, kl_kind) - entropy_coef * entropy
    aggregated over ``mask`` by ``agg`` (see the module docstring).

    Inputs are [B, T] (sequences are rows), or packed [N] with ``cu_seqlens`` [S + 1]
    (checked unless ``validate=False``). mask: bool or float weights. Metrics (0-dim,
    detached, on the device; no sync): clip_frac, dual_clip_frac, approx_kl (token mean
    of r - 1 - log r, an estimate of KL(old || new)), ratio_mean, ratio_max, pg_loss,
    and kl / entropy when given.
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
    seq_len, num_seqs = _layout("ppo_policy_loss", logp, cu_seqlens, "logp", validate)
    agg_code = _check_agg(agg)
    if kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind must be one of {KL_KINDS}; got {kl_kind!r}")
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp; got ref_logp=None")
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0; got {clip_low}, {clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None); got {dual_clip}")
    if resolve_impl("ppo_policy_loss", impl, logp) != "triton":
        return ppo_policy_loss_reference(
            _upcast(logp), _upcast(old_logp), _upcast(advantages), mask, clip_low, clip_high,
            dual_clip, _upcast(ref_logp), kl_coef, kl_kind, _upcast(entropy), entropy_coef, agg,
            cu_seqlens,
        )  # fmt: skip
    from fastrlhf.kernels.losses import PPO_METRICS

    stats, _ = _ppo_op(
        _flat(logp), _flat(old_logp), _flat(advantages), _flat(mask), _flat(ref_logp),
        _flat(entropy), _flat(cu_seqlens), seq_len, num_seqs, float(clip_low), float(clip_high),
        None if dual_clip is None else float(dual_clip), float(kl_coef), kl_kind,
        float(entropy_coef), agg_code,
    )  # fmt: skip
    drop = ("kl",) * (ref_logp is None) + ("entropy",) * (entropy is None)
    return stats[0], _metrics(stats, PPO_METRICS, drop)


# ---------------------------------------------------------------------------------------
# value_loss


def _value_backward(a, outputs, grads, needs):
    from fastrlhf.kernels.losses import value_bwd

    stats, partials = outputs
    d_values = value_bwd(a.values, a.old_values, a.returns, a.mask, a.cu_seqlens, partials,
                         stats, _loss_grad(grads, stats), a.seq_len, a.num_seqs, a.clip,
                         a.agg)  # fmt: skip
    return [d_values]


@fused_op(
    "value_loss",
    fake=lambda values, old, ret, mask, cu, seq_len, num_seqs, *_: _stats_fake(values, num_seqs),
    backward=_value_backward,
    differentiable=("values",),
)
def _value_op(
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
    from fastrlhf.kernels.losses import value_fwd

    return value_fwd(values, old_values, returns, mask, cu_seqlens, seq_len, num_seqs, clip, agg)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    *,
    cu_seqlens: torch.Tensor | None = None,
    validate: bool = True,
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((v - R)^2, (old + clamp(v - old, +-clip) - R)^2), fused.

    ``clip=None`` gives the plain 0.5 * (v - R)^2. Same layouts, ``agg``, ``validate``
    and ``impl`` as ppo_policy_loss. Metrics (detached, no sync): clip_frac (tokens where
    the clipped term is the larger), values_mean, values_max, mse (token mean of
    (v - R)^2).
    """
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES)
    check_tensor("mask", mask)
    _check_shapes(values=values, old_values=old_values, returns=returns, mask=mask)
    seq_len, num_seqs = _layout("value_loss", values, cu_seqlens, "values", validate)
    agg_code = _check_agg(agg)
    if clip is not None and not clip >= 0:
        raise ValueError(f"clip must be >= 0 (or None); got {clip}")
    if resolve_impl("value_loss", impl, values) != "triton":
        return value_loss_reference(
            _upcast(values), _upcast(old_values), _upcast(returns), mask, clip, agg, cu_seqlens
        )
    from fastrlhf.kernels.losses import VALUE_METRICS

    stats, _ = _value_op(
        _flat(values), _flat(old_values), _flat(returns), _flat(mask), _flat(cu_seqlens), seq_len,
        num_seqs, None if clip is None else float(clip), agg_code,
    )  # fmt: skip
    return stats[0], _metrics(stats, VALUE_METRICS)


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
    chosen_seq_kl: torch.Tensor | None = None,
    rejected_seq_kl: torch.Tensor | None = None,
    alpha: float = 0.5,
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
    TDPO (Zeng et al. 2024) with u = beta h and D = chosen_seq_kl / rejected_seq_kl, the
    sequential KL(pi_ref || pi_theta) summed over each response's tokens (``vocab_kl``):
        tdpo1:   -logsigmoid(u - (beta D_rejected - beta D_chosen))
        tdpo2:   -logsigmoid(u - alpha (beta D_rejected - sg(beta D_chosen)))
    (metrics add seq_kl_chosen and seq_kl_rejected).
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
    tdpo = kind in ("tdpo1", "tdpo2")
    if tdpo:
        for name, t in (("chosen_seq_kl", chosen_seq_kl), ("rejected_seq_kl", rejected_seq_kl)):
            if t is None:
                raise ValueError(f"kind={kind!r} needs {name} (sequential KL per response, [B])")
            check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=1)
        _check_shapes(policy_chosen_logp=policy_chosen_logp, chosen_seq_kl=chosen_seq_kl,
                      rejected_seq_kl=rejected_seq_kl)  # fmt: skip

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
        elif tdpo:
            d_c, d_r = beta * chosen_seq_kl, beta * rejected_seq_kl
            delta = d_r - d_c if kind == "tdpo1" else alpha * (d_r - d_c.detach())
            losses = -F.logsigmoid(beta * h - delta)
        else:
            losses = F.relu(1.0 - beta * h)
    chosen_r, rejected_r = chosen_r.detach(), rejected_r.detach()
    metrics = {
        "chosen_rewards": chosen_r.mean(),
        "rejected_rewards": rejected_r.mean(),
        "reward_accuracy": (chosen_r > rejected_r).to(chosen_r.dtype).mean(),
        "margins": (chosen_r - rejected_r).mean(),
    }
    if tdpo:
        metrics["seq_kl_chosen"] = chosen_seq_kl.detach().mean()
        metrics["seq_kl_rejected"] = rejected_seq_kl.detach().mean()
    return losses.mean(), metrics
