"""Numba packers: agree with the pure-Python references, respect the budget, balance ranks."""

from __future__ import annotations

import numpy as np
import pytest

from fastrlhf.data.packing import (
    ffd_bins,
    ffd_bins_reference,
    kk_groups,
    kk_groups_reference,
    pack_sequences,
    pack_sequences_reference,
)


def _check_partition(bins, lengths, max_tokens):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths))), "every sequence exactly once"
    assert all(b for b in bins), "no empty micro-batch"
    assert all(sum(lengths[i] for i in b) <= max_tokens for b in bins)


@pytest.mark.parametrize("n, max_len, max_tokens", [(1, 5, 5), (7, 9, 10), (500, 300, 1024)])
def test_ffd_agrees_with_reference_and_packs_tightly(n, max_len, max_tokens):
    rng = np.random.default_rng(n)
    lengths = rng.integers(1, max_len + 1, size=n)
    ours = pack_sequences(lengths, max_tokens)
    ref = pack_sequences_reference(lengths.tolist(), max_tokens)
    assert ours == ref
    _check_partition(ours, lengths.tolist(), max_tokens)
    # FFD uses at most 11/9 OPT + 6/9 bins, and OPT >= total / budget
    lower = int(np.ceil(lengths.sum() / max_tokens))
    assert len(ours) <= 11 / 9 * lower + 1


def test_ffd_is_first_fit_decreasing_on_a_hand_example():
    # sorted: 6(1) 5(3) 4(0) 3(2) 2(4) -> bins [6,4] [5,3,2] with budget 10
    assert ffd_bins(np.array([4, 6, 3, 5, 2]), 10) == [[1, 0], [3, 2, 4]]
    assert ffd_bins_reference([4, 6, 3, 5, 2], 10) == [[1, 0], [3, 2, 4]]


def test_kk_is_the_largest_differencing_method():
    # the textbook example: KK splits {8,7,6,5,4} into sums 16 / 14 (optimum is 15 / 15)
    groups = kk_groups(np.array([8, 7, 6, 5, 4]), 2)
    assert sorted(sum([8, 7, 6, 5, 4][i] for i in g) for g in groups) == [14, 16]
    assert groups == kk_groups_reference([8, 7, 6, 5, 4], 2)


@pytest.mark.parametrize("k", [2, 3, 8])
def test_kk_agrees_with_reference_and_balances(k):
    rng = np.random.default_rng(k)
    lengths = rng.integers(1, 400, size=999)
    ours = kk_groups(lengths, k)
    assert ours == kk_groups_reference(lengths.tolist(), k)
    sums = [int(lengths[g].sum()) for g in ours]
    assert max(sums) - min(sums) <= lengths.max()
    assert sorted(i for g in ours for i in g) == list(range(len(lengths)))


@pytest.mark.parametrize("algorithm", ["ffd", "kk"])
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_ranks_get_equal_micro_batch_counts(algorithm, num_ranks):
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 700, size=301)
    bins = pack_sequences(lengths, 2048, algorithm, num_ranks)
    assert bins == pack_sequences_reference(lengths.tolist(), 2048, algorithm, num_ranks)
    _check_partition(bins, lengths.tolist(), 2048)
    assert len(bins) % num_ranks == 0
    totals = [sum(int(lengths[i]) for b in bins[r::num_ranks] for i in b) for r in range(num_ranks)]
    if algorithm == "kk":  # balanced token counts per rank
        assert max(totals) - min(totals) <= lengths.max()


def test_too_few_sequences_for_the_ranks_is_an_error():
    with pytest.raises(ValueError, match="num_ranks"):
        pack_sequences([5, 5], 100, "kk", num_ranks=4)


@pytest.mark.parametrize(
    "lengths, kwargs, match",
    [
        ([3, 11, 2], {"max_tokens": 10}, r"lengths\[1\] = 11 exceeds max_tokens"),
        ([3, 0], {"max_tokens": 10}, r"lengths\[1\] = 0"),
        ([3], {"max_tokens": 10, "algorithm": "best"}, "algorithm"),
        ([3], {"max_tokens": 10, "num_ranks": 0}, "num_ranks"),
        ([[3]], {"max_tokens": 10}, "1-D"),
    ],
)
def test_bad_arguments(lengths, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pack_sequences(lengths, **kwargs)


def test_empty_input():
    assert pack_sequences([], 10) == [] == pack_sequences_reference([], 10)
