"""Packed batches: positions, cu_seqlens, shifted labels, preference pair order."""

from __future__ import annotations

import random

import pytest
import torch

from fastrlhf.data import (
    IGNORE_INDEX,
    PreferencePair,
    TokenizedSeq,
    collate_packed,
    collate_pairs,
)


def _naive_labels(seqs: list[TokenizedSeq]) -> list[int]:
    """Token by token: position t of a sequence predicts token t+1 when that one is a loss token."""
    out = []
    for s in seqs:
        for t in range(len(s.input_ids)):
            nxt = t + 1
            ok = nxt < len(s.input_ids) and s.loss_mask[nxt] == 1
            out.append(s.input_ids[nxt] if ok else IGNORE_INDEX)
    return out


def _random_seqs(rng: random.Random, n: int) -> list[TokenizedSeq]:
    seqs = []
    for i in range(n):
        length = rng.choice([1, 2, rng.randint(3, 40)])
        ids = [rng.randrange(1, 1000) for _ in range(length)]
        mask = [rng.randint(0, 1) for _ in range(length)]
        seqs.append(TokenizedSeq(ids, mask, meta={"i": i}))
    return seqs


def test_collate_packed_matches_a_token_by_token_construction():
    rng = random.Random(0)
    seqs = _random_seqs(rng, 23)
    b = collate_packed(seqs)
    lengths = [len(s.input_ids) for s in seqs]
    assert b.input_ids.dtype == torch.int64 and b.labels.dtype == torch.int64
    assert b.position_ids.dtype == torch.int64 and b.cu_seqlens.dtype == torch.int32
    assert b.input_ids.tolist() == [t for s in seqs for t in s.input_ids]
    assert b.position_ids.tolist() == [p for n in lengths for p in range(n)]
    assert b.cu_seqlens.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert b.seq_lens.tolist() == lengths
    assert b.max_seqlen == max(lengths) and b.num_seqs == len(seqs)
    assert b.num_tokens == sum(lengths)
    labels = _naive_labels(seqs)
    assert b.labels.tolist() == labels
    assert b.num_loss_tokens == sum(x != IGNORE_INDEX for x in labels)
    assert [m["i"] for m in b.meta] == list(range(len(seqs)))
    # the last token of every sequence never has a label
    assert (b.labels[b.cu_seqlens[1:].long() - 1] == IGNORE_INDEX).all()


def test_to_moves_tensors_and_keeps_metadata():
    b = collate_packed([TokenizedSeq([1, 2, 3], [0, 1, 1], meta="x")])
    moved = b.to("cpu")
    assert moved.meta == ["x"] and moved.max_seqlen == 3
    assert torch.equal(moved.labels, torch.tensor([2, 3, IGNORE_INDEX]))


def test_collate_pairs_orders_chosen_then_rejected():
    pairs = [
        PreferencePair([1, 2], [3, 4, 5], [6], meta=0),
        PreferencePair([7], [8], [9, 10], meta=1),
    ]
    b = collate_pairs(pairs)
    assert b.num_seqs == 4
    assert b.seq_lens.tolist() == [5, 3, 2, 3]
    assert b.input_ids.tolist() == [1, 2, 3, 4, 5, 1, 2, 6, 7, 8, 7, 9, 10]
    # loss on responses only: labels predict chosen/rejected tokens, never the prompt
    assert b.labels.tolist() == [-100, 3, 4, 5, -100, -100, 6, -100, 8, -100, 9, 10, -100]
    assert b.meta == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "seqs, match",
    [
        ([], "empty list"),
        ([TokenizedSeq([], [])], r"seqs\[0\].input_ids"),
        ([TokenizedSeq([1, 2], [1, 1]), TokenizedSeq([1, 2], [1])], r"seqs\[1\].loss_mask"),
    ],
)
def test_collate_rejects_bad_sequences(seqs, match):
    with pytest.raises(ValueError, match=match):
        collate_packed(seqs)


def test_collate_pairs_rejects_empty_responses():
    with pytest.raises(ValueError, match=r"pairs\[0\]"):
        collate_pairs([PreferencePair([1], [], [2])])
