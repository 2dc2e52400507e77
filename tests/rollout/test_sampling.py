"""Sampling filters and the sampler: float64 references, distributions, log-prob definition."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.rollout.sampling import sample_next_token, top_k_filter, top_p_filter
from tests.helpers import assert_close


def _top_p_keep_reference(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, float]:
    """Keep mask [B, V] by definition, in float64, with no sort: token j is kept iff the
    mass of the strictly more probable tokens is < top_p. Also returns the smallest
    distance between such a mass and top_p (the test's numerical margin)."""
    p = torch.softmax(logits.double(), dim=-1)  # [B, V]
    more_probable = p[:, None, :] > p[:, :, None]  # [B, j, i]: p_i > p_j
    mass_before = (p[:, None, :] * more_probable).sum(-1)  # [B, V]
    return mass_before < top_p, (mass_before - top_p).abs().min().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_filter_matches_float64_reference(dtype, top_p):
    # 7 rows x 131 tokens; scale 3 gives peaked rows, so nuclei range from 1 to ~100 tokens
    logits = (torch.randn(7, 131) * 3).to(dtype)
    keep_ref, margin = _top_p_keep_reference(logits, top_p)
    # float32 cumulative sums are ~1e-7 off; a reference mass within 1e-5 of top_p would make
    # the expected answer a rounding coin flip, which this seed avoids (checked, not assumed)
    assert margin > 1e-5, f"test input too close to the top_p boundary ({margin:.2e})"
    out = top_p_filter(logits, top_p)
    assert out.dtype == dtype and out.shape == logits.shape
    keep = torch.isfinite(out)
    assert torch.equal(keep, keep_ref), (keep != keep_ref).nonzero()[:5].tolist()
    assert torch.equal(out[keep], logits[keep])  # survivors untouched
    assert bool(keep.any(-1).all())


def test_top_p_filter_always_keeps_the_top_token():
    logits = torch.randn(5, 33)
    out = top_p_filter(logits, 1e-9)
    assert torch.equal(torch.isfinite(out).sum(-1), torch.ones(5, dtype=torch.long))
    assert torch.equal(out.argmax(-1), logits.argmax(-1))
    assert top_p_filter(logits, 1.0) is logits  # off
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(logits, 0.0)


@pytest.mark.parametrize("k", [1, 4, 32, 33, 0])
def test_top_k_filter(k):
    logits = torch.randn(6, 33, dtype=torch.float64)
    out = top_k_filter(logits, k)
    if k in (0, 33):
        assert out is logits
        return
    ranks = logits.argsort(-1, descending=True).argsort(-1)  # [B, V] rank of each token
    assert torch.equal(torch.isfinite(out), ranks < k)
    assert torch.equal(out[ranks < k], logits[ranks < k])


def test_top_k_keeps_ties_with_kth_value():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[True, False, True, True, False]]


def _filtered_probs64(logits, temperature, top_k, top_p):
    """Independent float64 sampling distribution: temperature -> top-k -> top-p."""
    z = logits.double() / temperature
    if top_k:
        kth = z.sort(-1, descending=True).values[:, top_k - 1 : top_k]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1:
        keep, _ = _top_p_keep_reference(z, top_p)
        z = z.masked_fill(~keep, float("-inf"))
    return torch.softmax(z, -1)


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 5, 1.0), (0.9, 6, 0.7)]
)
def test_sampled_frequencies_follow_the_filtered_distribution(temperature, top_k, top_p):
    v, draws = 11, 40_000
    logits = torch.randn(1, v) * 1.5
    expected = _filtered_probs64(logits, temperature, top_k, top_p)[0]  # [V]
    g = torch.Generator().manual_seed(123)
    tokens, _ = sample_next_token(
        logits.expand(draws, v), temperature=temperature, top_k=top_k, top_p=top_p, generator=g
    )
    freq = torch.bincount(tokens, minlength=v).double() / draws
    # never a filtered token; elsewhere within 5 binomial standard deviations
    assert bool((freq[expected == 0] == 0).all()), freq
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert bool(((freq - expected).abs() <= 5 * sigma + 1e-12).all()), (freq, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_unfiltered_log_softmax_at_temperature(dtype):
    logits = (torch.randn(9, 50) * 2).to(dtype)
    t = 0.6
    tokens, lp = sample_next_token(
        logits, temperature=t, top_k=7, top_p=0.8, generator=torch.Generator().manual_seed(0)
    )
    assert lp.dtype == torch.float32 and tokens.dtype == torch.int64
    ref = torch.log_softmax(logits.double() / t, -1).gather(-1, tokens[:, None])[:, 0]
    assert_close(lp, ref, atol=1e-5, rtol=1e-6, name="logprobs")
    # the filtered distribution would give larger values: prove the test can tell
    filt = torch.log_softmax(top_p_filter(top_k_filter(logits.double() / t, 7), 0.8), -1)
    assert bool((filt.gather(-1, tokens[:, None])[:, 0] > ref + 1e-3).any())


def test_greedy_is_argmax_with_temperature_one_logprobs():
    logits = torch.randn(5, 40)
    for kwargs in ({"temperature": 0.0}, {"do_sample": False, "temperature": 0.5}):
        tokens, lp = sample_next_token(logits, **kwargs)
        assert torch.equal(tokens, logits.argmax(-1))
        ref = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None])[:, 0]
        assert_close(lp, ref, atol=1e-6, name="greedy logprobs")


def test_generator_makes_sampling_reproducible():
    logits = torch.randn(8, 64)
    a = sample_next_token(logits, generator=torch.Generator().manual_seed(5))[0]
    b = sample_next_token(logits, generator=torch.Generator().manual_seed(5))[0]
    c = sample_next_token(logits, generator=torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(torch.randn(2, 5), temperature=-1.0)
    with pytest.raises(ValueError, match="logits"):
        sample_next_token(torch.randn(5))
    with pytest.raises(TypeError, match="logits"):
        top_p_filter([[1.0]], 0.5)


def test_top_p_keeps_tokens_tied_with_the_cutoff():
    # p = (0.42, 0.42, 0.16): the second token's tie with the first keeps it at any top_p
    logits = torch.tensor([[2.0, 2.0, 1.0]])
    assert torch.isfinite(top_p_filter(logits, 0.3)).tolist() == [[True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.9)).tolist() == [[True, True, True]]
