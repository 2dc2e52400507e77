"""TDPO kinds of dpo_loss, fed by vocab_kl, against a direct float64 computation from the
full logits of the policy and the reference (Zeng et al. 2024, eqs. for TDPO1 / TDPO2)."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.ops import dpo_loss, linear_vocab_kl, token_logprobs, vocab_kl
from fastrlhf.ops.reference import dpo_loss_reference
from tests.helpers import assert_close

B, T, V, BETA, ALPHA = 3, 5, 40, 0.3, 0.7


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    pol = torch.randn(2, B, T, V, generator=gen) * 2  # [chosen / rejected, B, T, V]
    ref = pol + torch.randn(2, B, T, V, generator=gen)
    labels = torch.randint(0, V, (2, B, T), generator=gen)
    mask = torch.ones(2, B, T, dtype=torch.bool)
    mask[0, 1, 3:] = False  # a shorter chosen response
    mask[1, 2, 4:] = False
    return pol, ref, labels, mask


def _direct64(pol, ref, labels, mask, kind):
    """Everything from log_softmax in float64, written out."""
    logp, logq = pol.double().log_softmax(-1), ref.double().log_softmax(-1)
    tok = lambda lp: lp.gather(-1, labels[..., None]).squeeze(-1)
    m = mask.double()
    logratio = ((tok(logp) - tok(logq)) * m).sum(-1)  # [2, B]
    seq_kl = ((logq.exp() * (logq - logp)).sum(-1) * m).sum(-1)  # KL(ref || policy)
    u = BETA * logratio[0] - BETA * logratio[1]
    d_w, d_l = BETA * seq_kl[0], BETA * seq_kl[1]
    delta = d_l - d_w if kind == "tdpo1" else ALPHA * (d_l - d_w.detach())
    return -torch.nn.functional.logsigmoid(u - delta).mean(), seq_kl


@pytest.mark.parametrize("kind", ["tdpo1", "tdpo2"])
def test_tdpo_loss_matches_float64_from_full_logits(kind):
    pol, ref, labels, mask = _batch()
    x = pol.clone().requires_grad_()
    lp = token_logprobs(x, labels) * mask
    ref_lp = token_logprobs(ref, labels) * mask
    seq_kl = vocab_kl(x, ref, mask=mask).sum(-1)  # [2, B]
    loss, metrics = dpo_loss(
        lp[0].sum(-1), lp[1].sum(-1), ref_lp[0].sum(-1), ref_lp[1].sum(-1), BETA, kind,
        chosen_seq_kl=seq_kl[0], rejected_seq_kl=seq_kl[1], alpha=ALPHA,
    )  # fmt: skip
    loss.backward()
    x64 = pol.double().requires_grad_()
    loss64, kl64 = _direct64(x64, ref, labels, mask, kind)
    loss64.backward()
    assert_close(loss.detach(), loss64.detach(), atol=1e-5, rtol=1e-5, name="loss")
    assert_close(x.grad, x64.grad, atol=1e-6, name="dlogits")
    assert_close(metrics["seq_kl_chosen"], kl64[0].mean().detach(), atol=1e-4, rtol=1e-5)
    # the reference's formula, on the same float64 inputs
    lp64 = (x64.detach().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1) * mask).sum(-1)
    rl64 = (ref.double().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1) * mask).sum(-1)
    ref_loss = dpo_loss_reference(
        lp64[0], lp64[1], rl64[0], rl64[1], BETA, kind,
        chosen_seq_kl=kl64[0].detach(), rejected_seq_kl=kl64[1].detach(), alpha=ALPHA,
    )  # fmt: skip
    assert_close(ref_loss, loss64.detach(), atol=1e-12, rtol=1e-12, name="reference")


def test_tdpo2_stops_the_chosen_kl_gradient():
    kl_c = torch.tensor([0.5, 1.0], requires_grad=True)
    kl_r = torch.tensor([0.7, 0.2], requires_grad=True)
    z = torch.zeros(2)
    loss, _ = dpo_loss(z, z, z, z, 0.1, "tdpo2", chosen_seq_kl=kl_c, rejected_seq_kl=kl_r)
    loss.backward()
    assert kl_c.grad is None and float(kl_r.grad.abs().min()) > 0  # sg(): no path to kl_c


def test_tdpo_needs_the_sequential_kls():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="chosen_seq_kl"):
        dpo_loss(z, z, z, z, 0.1, "tdpo1")
    with pytest.raises(ValueError, match="rejected_seq_kl must have the shape"):
        dpo_loss(z, z, z, z, 0.1, "tdpo1", chosen_seq_kl=z, rejected_seq_kl=torch.zeros(3))


def test_linear_vocab_kl_feeds_tdpo_like_vocab_kl():
    gen = torch.Generator().manual_seed(0)
    h, hr = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 4, 8, generator=gen)
    w = torch.randn(50, 8, generator=gen)
    expected = vocab_kl(h @ w.t(), hr @ w.t())
    assert_close(linear_vocab_kl(h, w, hr, w), expected, atol=2e-5, rtol=1e-5)
