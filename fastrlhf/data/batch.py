"""Tokenized examples and their padding-free (packed) batch form.

A batch of B sequences is stored as ONE row of N = sum(lengths) tokens:

    input_ids     [N]   int64   the sequences concatenated
    position_ids  [N]   int64   0..L_b-1 restarting at every sequence
    cu_seqlens    [B+1] int32   prefix sums of the lengths (flash-attn's varlen convention)
    labels        [N]   int64   labels[t] = input_ids[t+1] where token t+1 is a response
                                (loss) token of the SAME sequence, else -100

Labels are already shifted: the hidden state at position t predicts labels[t], so the
last token of every sequence has label -100 and a loss over hidden states needs no
further shifting. No padding is ever materialized.

Legend: B = sequences, N = packed tokens, L_b = length of sequence b.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class TokenizedSeq:
    """One example: token ids and a 0/1 mask that is 1 on response (loss) tokens."""

    input_ids: list[int]
    loss_mask: list[int]
    meta: Any = None


@dataclass
class PreferencePair:
    """A prompt with a chosen and a rejected response (token ids, no special joining)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    meta: Any = None


@dataclass
class PromptItem:
    """An RL prompt: its token ids, its text, and an optional reference answer."""

    input_ids: list[int]
    text: str
    answer: str | None = None
    meta: Any = None


@dataclass
class PackedBatch:
    """B sequences packed into one row of N tokens (see the module docstring)."""

    input_ids: torch.Tensor  # [N] int64
    position_ids: torch.Tensor  # [N] int64
    cu_seqlens: torch.Tensor  # [B+1] int32
    max_seqlen: int
    labels: torch.Tensor  # [N] int64, -100 where no loss
    num_loss_tokens: int
    meta: list[Any] | None = field(default=None)

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def seq_lens(self) -> torch.Tensor:
        """[B] int32 length of every sequence."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        move = lambda t: t.to(device, non_blocking=non_blocking)
        return replace(
            self,
            input_ids=move(self.input_ids),
            position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens),
            labels=move(self.labels),
        )


def cu_seqlens_from_lengths(lengths: Sequence[int] | np.ndarray) -> torch.Tensor:
    """[B+1] int32 prefix sums, starting at 0."""
    lens = np.asarray(lengths, dtype=np.int64)
    cu = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    if cu[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"packed batch of {cu[-1]} tokens overflows int32 cu_seqlens")
    return torch.from_numpy(cu.astype(np.int32))


def position_ids_from_lengths(lengths: Sequence[int] | np.ndarray) -> torch.Tensor:
    """[N] int64 positions restarting at 0 for every sequence."""
    lens = np.asarray(lengths, dtype=np.int64)
    n = int(lens.sum())
    # position = global index - start of the token's own sequence
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    return torch.from_numpy(np.arange(n, dtype=np.int64) - starts)


def collate_packed(seqs: Sequence[TokenizedSeq]) -> PackedBatch:
    """Pack tokenized sequences into one padding-free batch with shifted labels."""
    if len(seqs) == 0:
        raise ValueError("collate_packed: got an empty list of sequences")
    ids_parts, label_parts, lengths = [], [], []
    for i, s in enumerate(seqs):
        ids = np.asarray(s.input_ids, dtype=np.int64)
        mask = np.asarray(s.loss_mask, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(
                f"collate_packed: seqs[{i}].input_ids must be a non-empty list of ints"
            )
        if mask.shape != ids.shape:
            raise ValueError(
                f"collate_packed: seqs[{i}].loss_mask has length {mask.size}, "
                f"input_ids has length {ids.size}"
            )
        labels = np.full_like(ids, IGNORE_INDEX)
        # position t predicts token t+1: a label exists where the NEXT token is a loss token
        nxt = mask[1:] != 0
        labels[:-1][nxt] = ids[1:][nxt]
        ids_parts.append(ids)
        label_parts.append(labels)
        lengths.append(ids.size)
    input_ids = torch.from_numpy(np.concatenate(ids_parts))  # [N]
    labels = torch.from_numpy(np.concatenate(label_parts))  # [N]
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids_from_lengths(lengths),
        cu_seqlens=cu_seqlens_from_lengths(lengths),
        max_seqlen=int(max(lengths)),
        labels=labels,
        num_loss_tokens=int((labels != IGNORE_INDEX).sum()),
        meta=[s.meta for s in seqs],
    )


def pair_to_seqs(pair: PreferencePair) -> tuple[TokenizedSeq, TokenizedSeq]:
    """(prompt + chosen, prompt + rejected), with loss on the response tokens only."""
    p = list(pair.prompt_ids)
    chosen = TokenizedSeq(p + list(pair.chosen_ids), [0] * len(p) + [1] * len(pair.chosen_ids))
    rejected = TokenizedSeq(
        p + list(pair.rejected_ids), [0] * len(p) + [1] * len(pair.rejected_ids)
    )
    chosen.meta = rejected.meta = pair.meta
    return chosen, rejected


def collate_pairs(pairs: Sequence[PreferencePair]) -> PackedBatch:
    """Pack preference pairs: sequence 2i is pair i's chosen, 2i+1 its rejected completion."""
    if len(pairs) == 0:
        raise ValueError("collate_pairs: got an empty list of pairs")
    seqs: list[TokenizedSeq] = []
    for i, pair in enumerate(pairs):
        if len(pair.chosen_ids) == 0 or len(pair.rejected_ids) == 0:
            raise ValueError(f"collate_pairs: pairs[{i}] has an empty chosen or rejected response")
        seqs.extend(pair_to_seqs(pair))
    return collate_packed(seqs)
