"""Tests of masked_whiten, pack_padded / unpack_to_padded and group_advantages.

References: the float64 Python loops in fastrlhf.ops.reference.advantages, plus a
few values worked out by hand.
"""

from __future__ import annotations

import pytest
import torch

from fastrlhf.ops import group_advantages, masked_whiten, pack_padded, unpack_to_padded
from fastrlhf.ops.reference import (
    group_advantages_reference,
    masked_whiten_reference,
    packed_gae_reference,
)
from tests.helpers import assert_close, assert_close_to_reference

# ------------------------------------------------------------------- masked_whiten


@pytest.mark.parametrize("shape", [(37,), (5, 13)])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_reference(shape, with_mask, shift_mean):
    x = torch.randn(shape) * 3 + 2
    mask = (torch.rand(shape) > 0.4) if with_mask else None
    got = masked_whiten(x, mask, shift_mean=shift_mean)
    ref = masked_whiten_reference(x, mask, shift_mean=shift_mean)
    # PyTorch's own float32 answer: the library formula, unbiased var
    keep = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    xs = x[keep]
    same = (x - xs.mean()) * torch.rsqrt(xs.var(unbiased=True) + 1e-8)
    same = same if shift_mean else same + xs.mean()
    assert_close_to_reference(got, ref, same, atol=1e-6)
    kept = got[keep].double()
    if shift_mean:
        assert abs(kept.mean().item()) < 1e-5 and abs(kept.var().item() - 1) < 1e-4


def test_masked_whiten_bfloat16_and_degenerate_masks():
    x = torch.randn(64).bfloat16()
    assert masked_whiten(x).dtype == torch.float32
    # one kept element: no variance, scale 1, that element maps to 0
    one = torch.zeros(8, dtype=torch.bool)
    one[3] = True
    y = torch.randn(8)
    assert_close(masked_whiten(y, one), y - y[3], atol=1e-6)
    # nothing kept: mean 0, scale 1 (identity), no NaN and no host sync
    assert_close(masked_whiten(y, torch.zeros(8, dtype=torch.bool)), y, atol=0.0)
    with pytest.raises(ValueError, match="mask must have the shape"):
        masked_whiten(y, one[:5])


# ------------------------------------------------------------------ pack / unpack


def test_pack_unpack_round_trip_lengths():
    lengths = torch.tensor([3, 0, 7, 1, 0])
    x = torch.randn(5, 7, 2)  # [B, T, 2]
    packed, cu = pack_padded(x, lengths)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 10, 11, 11]
    assert packed.shape == (11, 2)
    assert torch.equal(packed[3:10], x[2])
    assert torch.equal(packed[10], x[3, 0])
    back = unpack_to_padded(packed, cu, pad_value=-1.0)  # [B, 7, 2]
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(back[b, :n], x[b, :n])
        assert bool((back[b, n:] == -1.0).all())
    assert unpack_to_padded(packed, cu, max_len=9).shape == (5, 9, 2)


def test_pack_with_mask_keeps_order_and_holes():
    x = torch.arange(12.0).reshape(3, 4)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    packed, cu = pack_padded(x, mask)
    assert packed.tolist() == [1.0, 2.0, 8.0, 10.0, 11.0]
    assert cu.tolist() == [0, 2, 2, 5]
    assert unpack_to_padded(packed, cu).tolist() == [[1, 2, 0], [0, 0, 0], [8, 10, 11]]


def test_pack_padded_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"mask must be \[B, T\]"):
        pack_padded(x, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"lengths must be \[B\]"):
        pack_padded(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="expected a"):
        pack_padded(x, torch.ones(3, 4, 1))


# -------------------------------------------------------------- group advantages


def test_grpo_and_rloo_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0])
    groups = torch.tensor([4, 4, 4, 9])  # one group of three, one of one
    eps = 1e-6
    assert_close(group_advantages(scores, groups, "grpo", eps=eps),
                 torch.tensor([-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0]), atol=1e-6)  # fmt: skip
    assert_close(group_advantages(scores, groups, "dr_grpo"), torch.tensor([-1.0, 0, 1, 0]))
    assert_close(group_advantages(scores, groups, "rloo"), torch.tensor([-1.5, 0, 1.5, 0]))


@pytest.mark.parametrize("kind,normalize_std", [("grpo", True), ("grpo", False), ("rloo", True)])
def test_group_advantages_match_reference(kind, normalize_std):
    scores = torch.randn(41)
    groups = torch.randint(-3, 1000, (12,))[torch.randint(0, 12, (41,))]  # sparse ids
    got = group_advantages(scores, groups, kind, normalize_std=normalize_std)
    ref = group_advantages_reference(scores, groups, kind, normalize_std=normalize_std)
    assert got.dtype == torch.float32
    assert_close(got, ref, atol=2e-6, rtol=1e-5)
    # dr_grpo is grpo without the std
    if kind == "grpo" and not normalize_std:
        assert_close(group_advantages(scores, groups, "dr_grpo"), got, atol=0.0)


def test_group_advantages_per_token():
    scores = torch.randn(4)
    groups = torch.tensor([0, 0, 1, 1])
    cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)
    mask = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    per_seq = group_advantages(scores, groups, "rloo")
    per_tok = group_advantages(scores, groups, "rloo", cu_seqlens=cu, mask=mask)
    want = torch.stack([per_seq[0], per_seq[0], 0 * per_seq[2], per_seq[2], per_seq[2], per_seq[3]])
    assert_close(per_tok, want, atol=0.0)
    assert group_advantages(scores, groups, "grpo", cu_seqlens=cu).shape == (6,)


def _reinforce_pp_by_loop(scores, cu, mask, gamma, token_rewards):
    """REINFORCE++ from its definition, float64 loops: [N]."""
    n = int(cu[-1])
    r = [0.0] * n if token_rewards is None else token_rewards.double().tolist()
    keep = mask.tolist()
    for b in range(len(cu) - 1):
        kept = [t for t in range(int(cu[b]), int(cu[b + 1])) if keep[t]]
        if kept:
            r[kept[-1]] += float(scores[b])
    ret, _ = packed_gae_reference(
        torch.tensor(r), torch.zeros(n), cu, gamma, 1.0, mask
    )  # discounted returns (values 0, lambda 1), checked by hand below
    return torch.where(mask, masked_whiten_reference(ret, mask), 0.0)


@pytest.mark.parametrize("with_token_rewards", [False, True])
def test_reinforce_pp_matches_definition(with_token_rewards):
    lengths = [4, 0, 9, 1, 6]
    cu = torch.zeros(6, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    n = int(cu[-1])
    mask = torch.rand(n) > 0.3
    mask[int(cu[3])] = False  # a sequence with no kept token: its score is dropped
    scores = torch.randn(5)
    token_rewards = 0.1 * torch.randn(n) if with_token_rewards else None
    got = group_advantages(
        scores, None, "reinforce++", cu_seqlens=cu, mask=mask, gamma=0.9,
        token_rewards=token_rewards,
    )  # fmt: skip
    want = _reinforce_pp_by_loop(scores, cu, mask, 0.9, token_rewards)
    assert_close(got, want, atol=1e-5)


def test_reinforce_pp_discounted_return_by_hand():
    # one sequence of 3 kept tokens, score 2 at the end, gamma 0.5: returns 0.5, 1, 2
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)
    got = group_advantages(torch.tensor([2.0, 0.0]), kind="reinforce++", cu_seqlens=cu, gamma=0.5)
    ret = torch.tensor([0.5, 1.0, 2.0, 0.0], dtype=torch.float64)
    assert_close(got, masked_whiten_reference(ret), atol=1e-6)
    # whiten=False: the returns themselves (a multi-process trainer whitens them globally)
    raw = group_advantages(
        torch.tensor([2.0, 0.0]), kind="reinforce++", cu_seqlens=cu, gamma=0.5, whiten=False
    )
    assert_close(raw, ret, atol=1e-6)


def test_group_advantages_errors():
    s = torch.randn(3)
    with pytest.raises(ValueError, match="kind must be one of"):
        group_advantages(s, torch.zeros(3, dtype=torch.long), "ppo")
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        group_advantages(s, kind="reinforce++")
    with pytest.raises(ValueError, match="group_ids must be an integer tensor"):
        group_advantages(s, torch.zeros(3), "grpo")
    with pytest.raises(ValueError, match="group_ids must be an integer tensor"):
        group_advantages(s, torch.zeros(2, dtype=torch.long), "rloo")
    with pytest.raises(ValueError, match=r"cu_seqlens must be \[B\+1\]"):
        group_advantages(s, torch.zeros(3, dtype=torch.long), cu_seqlens=torch.zeros(3).int())
    with pytest.raises(ValueError, match="scores must be a 1-D tensor"):
        group_advantages(s[None], torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(
    "cu,message",
    [
        ([1, 3, 6], r"must start at 0; got cu_seqlens\[0\] = 1"),
        ([0, 4, 2, 6], r"must not decrease; got cu_seqlens\[1\] = 4 > cu_seqlens\[2\] = 2"),
        ([0, 3, 5], r"must end at total_tokens = 6 \(len\(\w+\)\); got cu_seqlens\[2\] = 5"),
        ([0, 3, 9], r"must end at total_tokens = 6 \(len\(\w+\)\); got cu_seqlens\[2\] = 9"),
    ],
)
def test_packed_layout_is_validated_like_packed_gae(cu, message):
    cu = torch.tensor(cu, dtype=torch.int32)
    x = torch.randn(6)
    with pytest.raises(ValueError, match="unpack_to_padded: cu_seqlens " + message):
        unpack_to_padded(x, cu)
    scores = torch.randn(cu.numel() - 1)
    for kind in ("grpo", "reinforce++"):
        with pytest.raises(ValueError, match="group_advantages: cu_seqlens " + message):
            group_advantages(scores, torch.zeros_like(cu[1:]), kind, cu_seqlens=cu, mask=x > 0)
