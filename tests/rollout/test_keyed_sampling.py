"""Keyed sampling: per-sequence keys, keyed uniforms, inverse-CDF draws, and rollouts that do
not depend on the batch they are generated in (data-parallel layout invariance)."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.rollout import GenerationConfig, generate, pack_prompts
from fastrlhf.rollout.sampling import (
    _inverse_cdf_sample,
    keyed_uniform,
    sample_next_token,
    sequence_keys,
)
from tests.helpers import assert_close
from tests.rollout.tiny import random_prompts, tiny_lm

M32 = 2**32


def _mix32_spec(x: int) -> int:
    """The mixing function as plain modular arithmetic on Python ints (no int64 anywhere)."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) % M32
    return (x >> 16) ^ x


def _absorb_spec(state: int, value: int) -> int:
    words = [(value >> (32 * i)) % M32 for i in range(max(1, -(-value.bit_length() // 32)))]
    for w in [len(words), *words]:
        state = _mix32_spec(state ^ w)
    return state


def _sequence_key_spec(seed: int, step: int, i: int) -> int:
    """sequence_keys for one id, from its definition, as an unbounded Python int."""
    lo, hi = i % M32, (i >> 32) % M32
    lanes = []
    for start in (0x243F6A88, 0x85A308D3):
        state = _absorb_spec(_absorb_spec(start, seed), step)
        lanes.append(_mix32_spec(_mix32_spec(lo ^ state) ^ hi))
    return lanes[0] * 2**31 + lanes[1] // 2


def test_sequence_keys_equal_exact_integer_arithmetic_for_huge_inputs():
    # int64 wrap-around or a sign error would show here: seeds past 2**64, ids up to 2**63 - 1
    ids = [0, 1, 2, 2**31, M32 - 1, M32, 2**62 + 12345, 2**63 - 1]
    for seed, step in [(0, 0), (7, 3), (2**40, 5), (2**100 + 3, 2**33)]:
        keys = sequence_keys(seed, step, torch.tensor(ids))
        assert keys.dtype == torch.int64 and bool((keys >= 0).all())
        assert keys.tolist() == [_sequence_key_spec(seed, step, i) for i in ids]


def test_sequence_keys_are_deterministic_distinct_and_element_wise():
    ids = torch.cat([torch.arange(1500), torch.randint(0, 2**62, (500,))])  # [2000]
    keys = sequence_keys(3, 11, ids)
    assert torch.equal(keys, sequence_keys(3, 11, ids.clone()))
    assert torch.equal(sequence_keys(3, 11, ids[:1500].int()), keys[:1500])  # int32 ids
    # a permuted or sub-selected ids tensor gets the same key per id: no dependence on B
    perm = torch.randperm(ids.numel())
    assert torch.equal(sequence_keys(3, 11, ids[perm]), keys[perm])
    sub = torch.tensor([1999, 5, 0, 1234])
    assert torch.equal(sequence_keys(3, 11, ids[sub]), keys[sub])
    # distinct over seeds (large ones too), steps and ids: 12 x 2000 keys, no collision
    all_keys = torch.cat(
        [sequence_keys(seed, step, ids) for seed in (0, 1, 2**32, 2**40) for step in (0, 1, 2**33)]
    )
    assert all_keys.unique().numel() == all_keys.numel()


def test_keyed_uniform_is_uniform_with_uncorrelated_positions():
    n = 100_000
    keys = sequence_keys(5, 0, torch.arange(n))
    u0, u1 = keyed_uniform(keys, 0), keyed_uniform(keys, 1)
    assert u0.dtype == torch.float64 and u0.shape == (n,)
    assert torch.equal(u0, keyed_uniform(keys.clone(), 0))
    assert bool(((u0 > 0) & (u0 < 1)).all())
    assert u0.unique().numel() == n
    # 5 standard errors: 0.0009 for the mean of n uniforms, 0.00024 for their variance
    for u in (u0, u1, keyed_uniform(keys, 2**40)):
        assert abs(u.mean().item() - 0.5) < 0.0046
        assert abs(u.var().item() - 1 / 12) < 0.0012
    # the low bits are random too (they come from the second hash): frac(u * 2**30) is
    # uniform only if bits 31..52 are
    low = torch.frac(u0 * 2**30)
    assert abs(low.mean().item() - 0.5) < 0.0046 and abs(low.var().item() - 1 / 12) < 0.0012

    def corr(a, b):
        return torch.corrcoef(torch.stack([a, b]))[0, 1].abs().item()

    assert corr(u0, u1) < 0.02  # adjacent positions of one sequence
    assert corr(u0[:-1], u0[1:]) < 0.02  # adjacent sequences at one position
    assert corr(keyed_uniform(keys, 7), keyed_uniform(keys, 8)) < 0.02
    # one key over many positions is uniform as well (1000 keys x 100 positions)
    per_t = torch.stack([keyed_uniform(keys[:1000], t) for t in range(100)])  # [100, 1000]
    assert abs(per_t.mean().item() - 0.5) < 0.0046
    assert abs(per_t.var().item() - 1 / 12) < 0.0012


def test_bad_key_arguments_are_named():
    ids = torch.arange(4)
    with pytest.raises(ValueError, match="seed"):
        sequence_keys(-1, 0, ids)
    with pytest.raises(TypeError, match="step"):
        sequence_keys(0, 1.0, ids)
    with pytest.raises(TypeError, match="ids"):
        sequence_keys(0, 0, ids.float())
    with pytest.raises(ValueError, match="ids"):
        sequence_keys(0, 0, ids[None])
    with pytest.raises(ValueError, match=r"\bt\b"):
        keyed_uniform(sequence_keys(0, 0, ids), -1)
    with pytest.raises(TypeError, match="keys"):
        keyed_uniform(ids.int(), 0)


def test_inverse_cdf_never_returns_a_zero_probability_token():
    # zero-probability tokens first, in the middle and LAST: a u rounded up to the total,
    # or a boundary hit exactly, must move to the next token that has mass, never to these
    probs = torch.tensor(
        [
            [0.0, 0.25, 0.0, 0.0, 0.5, 0.25, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            [0.125, 0.0, 0.375, 0.0, 0.0, 0.0, 0.5, 0.0],
        ]
    )
    u_min, u_max = 2.0**-53, 1 - 2.0**-53  # keyed_uniform's extremes
    us = [u_min, 0.25, 0.5, 0.75, 0.125, 0.875, 1 - 2.0**-30, u_max]
    p64 = probs.double()
    cdf64 = p64.cumsum(-1)  # exact: dyadic probabilities
    for u in us:
        uu = torch.full((3,), u, dtype=torch.float64)
        tokens = _inverse_cdf_sample(probs, uu)
        # definition: the first token with mass whose cumulative probability exceeds u
        ref = ((cdf64 > uu[:, None]) & (p64 > 0)).int().argmax(-1)
        assert torch.equal(tokens, ref), (u, tokens, ref)
        assert bool((probs.gather(-1, tokens[:, None]) > 0).all())


def _filtered_probs64(logits: torch.Tensor, t: float, top_k: int, top_p: float) -> torch.Tensor:
    """The sampling distribution [V] of one logits row [V], in float64, by definition."""
    z = logits.double() / t
    if top_k:
        z = z.masked_fill(z < z.sort(descending=True).values[top_k - 1], float("-inf"))
    p = torch.softmax(z, -1)
    if top_p < 1:  # keep j iff the mass of the strictly more probable tokens is < top_p
        mass_before = (p[None, :] * (p[None, :] > p[:, None])).sum(-1)
        p = torch.where(mass_before < top_p, p, 0.0)
        p = p / p.sum()
    return p


def _chi2_pvalue(counts: torch.Tensor, expected_p: torch.Tensor) -> float:
    """Pearson chi-square p-value over the bins with expected mass."""
    n = counts.sum()
    support = expected_p > 0
    e = n * expected_p[support]
    stat = ((counts[support] - e) ** 2 / e).sum()
    dof = int(support.sum()) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2).item()


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (1.2, 0, 0.9), (1.3, 3, 1.0), (1.5, 6, 0.95)]
)
def test_keyed_frequencies_follow_the_filtered_distribution(temperature, top_k, top_p):
    v, draws = 8, 20_000
    logits = torch.randn(1, v) * 1.5
    expected = _filtered_probs64(logits[0], temperature, top_k, top_p)  # [V]
    keys = sequence_keys(17, 4, torch.arange(draws))
    tokens, lp = sample_next_token(
        logits.expand(draws, v),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        keys=keys,
        position=3,
    )
    counts = torch.bincount(tokens, minlength=v).double()
    freq = counts / draws
    assert bool((counts[expected == 0] == 0).all()), (freq, expected)  # never a filtered one
    assert (freq - expected).abs().max().item() < 0.01, (freq, expected)
    assert _chi2_pvalue(counts, expected) > 1e-3, (freq, expected)
    # the same statistic rejects the distribution of a wrong temperature: the test has power
    wrong = _filtered_probs64(logits[0], temperature * 1.5, top_k, top_p)
    assert _chi2_pvalue(counts, wrong) < 1e-6
    # the log-prob is that of the unfiltered distribution at temperature T
    ref = torch.log_softmax(logits[0].double() / temperature, -1)[tokens]
    assert_close(lp, ref, atol=1e-6, rtol=1e-6, name="keyed logprobs")


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (40, 0.9)])
def test_a_rows_token_does_not_depend_on_the_other_rows(top_k, top_p):
    b, v = 37, 301
    logits = torch.randn(b, v) * 2
    keys = sequence_keys(1, 2, torch.arange(100, 100 + b))
    kw = dict(temperature=0.8, top_k=top_k, top_p=top_p, position=5)
    tokens, lp = sample_next_token(logits, keys=keys, **kw)
    rev_tokens, rev_lp = sample_next_token(logits.flip(0), keys=keys.flip(0), **kw)
    assert torch.equal(rev_tokens.flip(0), tokens) and torch.equal(rev_lp.flip(0), lp)
    sub = torch.tensor([30, 2, 17])
    sub_tokens, sub_lp = sample_next_token(logits[sub], keys=keys[sub], **kw)
    assert torch.equal(sub_tokens, tokens[sub]) and torch.equal(sub_lp, lp[sub])
    # the key and the position are what decides: changing either changes the draws
    assert (sample_next_token(logits, keys=keys + 1, **kw)[0] != tokens).sum() > b // 4
    kw["position"] = 6
    assert (sample_next_token(logits, keys=keys, **kw)[0] != tokens).sum() > b // 4


def test_keyed_greedy_is_argmax_and_bad_keys_are_named():
    logits = torch.randn(5, 40)
    keys = sequence_keys(0, 0, torch.arange(5))
    assert torch.equal(sample_next_token(logits, temperature=0.0, keys=keys)[0], logits.argmax(-1))
    with pytest.raises(ValueError, match="generator"):
        sample_next_token(logits, keys=keys, generator=torch.Generator().manual_seed(0))
    for bad in (keys[:4], keys.int(), keys[:, None], keys.to("meta")):
        with pytest.raises(ValueError, match=r"keys must be int64 of shape \(5,\).*got shape"):
            sample_next_token(logits, keys=bad)
    with pytest.raises(ValueError, match="position"):
        sample_next_token(logits, keys=keys, position=-1)


def _per_sequence(r):
    """[(tokens, log-probs)] per sequence of a Rollout."""
    lens = r.cu_seqlens.diff().tolist()
    return list(zip(torch.split(r.input_ids, lens), torch.split(r.logprobs, lens)))


def _keyed_reference(model, prompt, key, steps, eos, **cfg):
    """One sequence, no cache, no batch: a full forward per step, then the keyed draw at
    response position t. Returns (response tokens, their log-probs)."""
    seq, lps = prompt.clone(), []
    with torch.no_grad():
        for t in range(steps):
            hidden = model.model(input_ids=seq[None], use_cache=False).last_hidden_state[:, -1]
            logits = hidden @ model.lm_head.weight.t()  # [1, V]
            tok, lp = sample_next_token(logits, keys=key[None], position=t, **cfg)
            seq, lps = torch.cat([seq, tok]), lps + [lp]
            if int(tok) == eos:
                break
    return seq[prompt.numel() :], torch.cat(lps)


def test_keyed_rollouts_do_not_depend_on_the_batch():
    model = tiny_lm()
    a, b, c = random_prompts((5, 9, 3), seed=4)  # other lengths: other left padding
    keys = sequence_keys(123, 7, torch.tensor([0, 1, 2]))  # one key per prompt
    cfg = dict(temperature=1.0, top_k=40, top_p=0.95)

    def run(prompts, k, **extra):
        ids, cu = pack_prompts(prompts)
        config = GenerationConfig(max_new_tokens=10, **cfg, **extra)
        return generate(model, ids, cu, config, sample_keys=k)

    full = run([a, b, c], keys)
    # an EOS that sequence 0 samples at its 3rd step: rows finish at different times
    eos = int(full.responses()[0][2])
    full = run([a, b, c], keys, eos_token_id=eos)
    assert int(full.response_lens[0]) <= 3 < int(full.response_lens.max())
    ref = _per_sequence(full)
    for i, p in enumerate((a, b, c)):  # each sequence = its keyed draws at t = 0, 1, ...
        resp, lp = _keyed_reference(model, p, keys[i], 10, eos, **cfg)
        n = p.numel()
        assert torch.equal(ref[i][0][n:], resp), i
        assert_close(ref[i][1][n:], lp, atol=1e-5, name=f"logprobs of {i} vs reference")
    for order in ([2, 0], [1], [1, 2, 0]):
        prompts = [(a, b, c)[i] for i in order]
        got = _per_sequence(run(prompts, keys[order], eos_token_id=eos))
        for j, i in enumerate(order):
            assert torch.equal(got[j][0], ref[i][0]), (order, i)
            assert_close(got[j][1], ref[i][1], atol=1e-5, name=f"logprobs of {i} in {order}")
    # other keys, other samples; the same keys again, the same samples
    other = run([a, b, c], sequence_keys(123, 8, torch.tensor([0, 1, 2])))
    assert not torch.equal(other.input_ids, run([a, b, c], keys).input_ids)
    assert torch.equal(run([a, b, c], keys).input_ids, run([a, b, c], keys).input_ids)


def test_generate_rejects_bad_sample_keys():
    model = tiny_lm()
    ids, cu = pack_prompts(random_prompts((3, 2)))
    cfg = GenerationConfig(max_new_tokens=2)
    keys = sequence_keys(0, 0, torch.arange(2))
    with pytest.raises(ValueError, match=r"sample_keys must be int64 of shape \(2,\)"):
        generate(model, ids, cu, cfg, sample_keys=keys[:1])
    with pytest.raises(ValueError, match="sample_keys"):
        generate(model, ids, cu, cfg, sample_keys=keys.int())
    with pytest.raises(ValueError, match="generator or sample_keys"):
        generate(model, ids, cu, cfg, sample_keys=keys, generator=torch.Generator())


@pytest.mark.gpu
def test_keys_uniforms_and_draws_are_the_same_on_cuda():
    ids = torch.cat([torch.arange(4096), torch.randint(0, 2**62, (4096,))])
    keys = sequence_keys(2**40 + 1, 9, ids)
    assert torch.equal(sequence_keys(2**40 + 1, 9, ids.cuda()).cpu(), keys)
    for t in (0, 1, 1000):
        assert torch.equal(keyed_uniform(keys.cuda(), t).cpu(), keyed_uniform(keys, t))
    # draws on CUDA follow the distribution and never pick a filtered token
    v, draws = 8, 200_000
    logits = torch.randn(1, v) * 1.5
    expected = _filtered_probs64(logits[0], 0.9, 5, 0.7)
    k = sequence_keys(3, 0, torch.arange(draws, device="cuda"))
    tokens, _ = sample_next_token(
        logits.cuda().expand(draws, v), temperature=0.9, top_k=5, top_p=0.7, keys=k
    )
    counts = torch.bincount(tokens.cpu(), minlength=v).double()
    assert bool((counts[expected == 0] == 0).all())
    assert _chi2_pvalue(counts, expected) > 1e-3
