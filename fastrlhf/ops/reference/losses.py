"""Pure-PyTorch references of the RL losses: kl_penalty, ppo_policy_loss, value_loss, dpo_loss.

Shapes: B = sequences, T = tokens per padded sequence, N = packed tokens, S = sequences
given by ``cu_seqlens`` [S + 1]. Per-token inputs are either [B, T] (a [B, T] mask
defines the sequences) or packed [N] with ``cu_seqlens`` (tokens outside every
[cu_seqlens[s], cu_seqlens[s+1]) range are ignored).

Aggregations of a per-token loss l with mask m (weights; usually 0/1):
    token-mean           sum(m l) / sum(m)
    seq-mean-token-mean  mean over non-empty sequences s of sum_s(m l) / sum_s(m)
    seq-mean-token-sum   mean over non-empty sequences s of sum_s(m l)
A sequence whose mask sums to 0 is left out of the mean (it is not a 0 term); if no
token is left the loss is 0. Masked-out positions never contribute, even if their
per-token value is not finite (padding may hold garbage).

Cost: every reference is a chain of elementwise PyTorch ops, each of which reads and
writes a full [N] float tensor: ppo_policy_loss_reference makes ~25 such passes forward
(~100 N bytes read and written in float32) and as many again in the backward, with
one kernel launch per op; that chain is what the fused kernel replaces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrlhf.ops._checks import AGGS, DPO_KINDS, KL_KINDS


def kl_penalty_reference(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3"
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference, differentiable.

    k1: logp - ref; abs: |logp - ref|; k2: (logp - ref)^2 / 2;
    k3: exp(d) - d - 1 with d = clamp(ref - logp, -20, 20), clamped to [-10, 10].
    "<kind>+st" keeps the value of <kind> and takes the gradient of k2.
    """
    st = kind.endswith("+st")
    base = kind[:-3] if st else kind
    diff = logp - ref_logp
    if base == "k1":
        value = diff
    elif base == "abs":
        value = diff.abs()
    elif base == "k2":
        value = 0.5 * diff.square()
    elif base == "k3":
        d = (-diff).clamp(-20.0, 20.0)
        value = (d.exp() - d - 1.0).clamp(-10.0, 10.0)
    else:
        raise ValueError(f"kind must be one of {KL_KINDS}; got {kind!r}")
    if st:
        k2 = 0.5 * diff.square()
        value = k2 + (value - k2).detach()
    return value


def _segments(mask: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Sequence id of every token ([N] long, -1 outside every sequence) and S.

    Vectorised (no host sync, so torch.compile traces it). Offsets that are not a valid
    layout (only reachable with the ops' ``validate=False``) give some in-range ids or
    -1, never an index error.
    """
    if cu_seqlens is None:
        b, t = mask.shape
        return torch.arange(b, device=mask.device).repeat_interleave(t), b
    n, s = mask.numel(), cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    pos = torch.arange(n, device=mask.device)
    ids = torch.searchsorted(cu, pos, right=True) - 1
    inside = (pos >= cu[0]) & (pos < cu[-1]) & (ids >= 0) & (ids < s)
    return torch.where(inside, ids, -1), s


def _weights(mask: torch.Tensor, cu_seqlens, dtype: torch.dtype):
    """(ids [N], S, m [N]): sequence ids and the mask as weights, 0 outside every sequence.

    Computed once per loss and shared by its aggregation and metrics.
    """
    ids, s = _segments(mask, cu_seqlens)
    return ids, s, mask.reshape(-1).to(dtype) * (ids >= 0)


def _aggregate(loss: torch.Tensor, ids, s: int, m: torch.Tensor, agg: str) -> torch.Tensor:
    ml = torch.where(m != 0, loss.reshape(-1), 0.0) * m
    zero = loss.new_zeros(())
    if agg == "token-mean":
        total = m.sum()
        return torch.where(total > 0, ml.sum() / total.clamp(min=1e-30), zero)
    seg = torch.where(ids >= 0, ids, s)  # bucket s: tokens outside every sequence (m = 0)
    buckets = torch.zeros(s + 1, dtype=loss.dtype, device=loss.device)
    seq_sum = buckets.index_add(0, seg, ml)[:s]
    seq_cnt = buckets.index_add(0, seg, m)[:s]
    nonempty = seq_cnt > 0
    n_seq = nonempty.sum()
    if agg == "seq-mean-token-mean":
        per_seq = torch.where(nonempty, seq_sum / seq_cnt.clamp(min=1e-30), 0.0)
    elif agg == "seq-mean-token-sum":
        per_seq = torch.where(nonempty, seq_sum, 0.0)
    else:
        raise ValueError(f"agg must be one of {AGGS}; got {agg!r}")
    return torch.where(n_seq > 0, per_seq.sum() / n_seq.clamp(min=1), zero)


def aggregate_reference(
    loss: torch.Tensor, mask: torch.Tensor, agg: str, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked aggregation of a per-token loss ([B, T] or packed [N]); see the module doc."""
    return _aggregate(loss, *_weights(mask, cu_seqlens, loss.dtype), agg)


def _metric_fns(ids, s: int, m: torch.Tensor):
    """(token mean, max) over the kept tokens, detached; the max is 0 when none is kept."""

    def mean(x: torch.Tensor) -> torch.Tensor:
        return _aggregate(x.to(m.dtype), ids, s, m, "token-mean").detach()

    def top(x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.new_zeros(())
        keep = m != 0
        best = torch.where(keep, x.reshape(-1), float("-inf")).max()
        return torch.where(keep.any(), best, 0.0).detach()

    return mean, top


def ppo_policy_loss_reference(
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
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate (+ KL, - entropy bonus), aggregated; differentiable in logp."""
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if dual_clip is not None:
        pg3 = -advantages * dual_clip
        dual = (advantages < 0) & (pg > pg3)
        pg = torch.where(dual, pg3, pg)
    loss_tok = pg
    kl = None
    if ref_logp is not None:
        kl = kl_penalty_reference(logp, ref_logp, kl_kind)
        loss_tok = loss_tok + kl_coef * kl
    if entropy is not None:
        loss_tok = loss_tok - entropy_coef * entropy
    ids, s, m = _weights(mask, cu_seqlens, loss_tok.dtype)
    loss = _aggregate(loss_tok, ids, s, m, agg)
    mm, mmax = _metric_fns(ids, s, m)
    metrics = {
        "clip_frac": mm(pg2 > pg1),
        "dual_clip_frac": mm(dual),
        "approx_kl": mm(ratio - 1.0 - log_ratio),
        "ratio_mean": mm(ratio),
        "ratio_max": mmax(ratio),
        "pg_loss": mm(pg),
    }
    if kl is not None:
        metrics["kl"] = mm(kl)
    if entropy is not None:
        metrics["entropy"] = mm(entropy)
    return loss, metrics


def value_loss_reference(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * max((v - R)^2, (old + clamp(v - old, -clip, clip) - R)^2), aggregated."""
    l1 = (values - returns).square()
    if clip is None:
        l2 = l1
    else:
        l2 = (old_values + (values - old_values).clamp(-clip, clip) - returns).square()
    ids, s, m = _weights(mask, cu_seqlens, l1.dtype)
    loss = _aggregate(0.5 * torch.maximum(l1, l2), ids, s, m, agg)
    mm, mmax = _metric_fns(ids, s, m)
    metrics = {
        "clip_frac": mm(l2 > l1),
        "values_mean": mm(values),
        "values_max": mmax(values),
        "mse": mm(l1),
    }
    return loss, metrics


def dpo_loss_reference(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor | None,
    ref_rejected_logp: torch.Tensor | None,
    beta: float = 0.1,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    gamma: float = 0.5,
    chosen_seq_kl: torch.Tensor | None = None,
    rejected_seq_kl: torch.Tensor | None = None,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Mean preference loss over the batch, written from the papers' formulas.

    Written independently of ``fastrlhf.ops.dpo_loss`` (naive log(sigmoid), explicit
    odds) so the tests compare two derivations in float64.
    """
    log_sig = lambda x: torch.log(1.0 / (1.0 + torch.exp(-x)))
    if kind in ("simpo", "orpo"):
        avg_c = policy_chosen_logp / chosen_lengths
        avg_r = policy_rejected_logp / rejected_lengths
        if kind == "simpo":
            z = beta * (avg_c - avg_r) - gamma
            losses = -(1 - label_smoothing) * log_sig(z) - label_smoothing * log_sig(-z)
        else:
            odds_c = torch.exp(avg_c) / (1 - torch.exp(avg_c))
            odds_r = torch.exp(avg_r) / (1 - torch.exp(avg_r))
            losses = -avg_c - beta * log_sig(torch.log(odds_c / odds_r))
        return losses.mean()
    h = (policy_chosen_logp - ref_chosen_logp) - (policy_rejected_logp - ref_rejected_logp)
    if kind == "sigmoid":
        z = beta * h
        losses = -(1 - label_smoothing) * log_sig(z) - label_smoothing * log_sig(-z)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        losses = F.relu(1 - beta * h)
    elif kind == "tdpo1":
        losses = -log_sig(beta * h - (beta * rejected_seq_kl - beta * chosen_seq_kl))
    elif kind == "tdpo2":
        # sg(): the chosen response's KL enters the value, not the gradient
        sg_c = beta * chosen_seq_kl.detach()
        losses = -log_sig(beta * h - alpha * (beta * rejected_seq_kl - sg_c))
    else:
        raise ValueError(f"kind must be one of {DPO_KINDS}; got {kind!r}")
    return losses.mean()
