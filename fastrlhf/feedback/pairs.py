"""Votes -> one label per (item, response pair, annotator): the unit every statistic and
the export work on.

For an item with K responses the units are its K(K-1)/2 unordered pairs (i, j), i < j.
A vote gives each unit one label:

- ``FIRST`` (0): response i is better than response j (i ranked above j),
- ``SECOND`` (1): response j is better,
- ``TIE`` (2): a pairwise tie.

"Can't tell" votes give no label (they are missing data). A pairwise vote has one unit;
a ranking of K has K(K-1)/2, which is how InstructGPT turns a ranking into comparisons.
A gold ranking gives the gold label of each unit the same way (gold has no ties).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from fastrlhf.feedback.store import Item, Vote

FIRST, SECOND, TIE = 0, 1, 2
LABEL_NAMES = {FIRST: "first", SECOND: "second", TIE: "tie"}


@dataclass(frozen=True)
class PairLabel:
    item_id: str
    i: int  # the lower response index
    j: int  # the higher response index
    annotator: str
    label: int  # FIRST | SECOND | TIE
    strength: int  # the vote's strength, 1 when it gave none
    flagged: bool  # the vote carries a flag (harmful, unsure, ...)

    @property
    def unit(self) -> tuple[str, int, int]:
        return (self.item_id, self.i, self.j)


def ranking_labels(ranking: list[int]) -> dict[tuple[int, int], int]:
    """{(i, j): FIRST | SECOND} for every pair i < j of a ranking (best first)."""
    pos = {r: p for p, r in enumerate(ranking)}
    k = len(ranking)
    return {(i, j): FIRST if pos[i] < pos[j] else SECOND for i in range(k) for j in range(i + 1, k)}


def vote_labels(v: Vote, k: int) -> dict[tuple[int, int], int]:
    """The labels one vote gives; {} for "can't tell"."""
    if v.cant_tell:
        return {}
    if v.tie:
        return {(i, j): TIE for i in range(k) for j in range(i + 1, k)}
    return ranking_labels(v.ranking)


def pair_labels(votes: Iterable[Vote], items: dict[str, Item]) -> list[PairLabel]:
    """Every (unit, annotator) label of ``votes`` (active votes: one per item and annotator)."""
    out = []
    for v in votes:
        k = items[v.item_id].k
        for (i, j), label in sorted(vote_labels(v, k).items()):
            out.append(
                PairLabel(v.item_id, i, j, v.annotator, label, v.strength or 1, bool(v.flags))
            )
    return out


def gold_labels(items: Iterable[Item]) -> dict[tuple[str, int, int], int]:
    """{(item, i, j): FIRST | SECOND} for every unit of every gold item."""
    out = {}
    for it in items:
        if it.gold is not None:
            for (i, j), label in ranking_labels(it.gold).items():
                out[(it.id, i, j)] = label
    return out


def gold_accuracy(
    labels: Iterable[PairLabel], gold: dict[tuple[str, int, int], int]
) -> dict[str, tuple[int, int]]:
    """{annotator: (correct, total)} over their labels on gold units (a tie is wrong)."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for pl in labels:
        want = gold.get(pl.unit)
        if want is not None:
            counts[pl.annotator][0] += pl.label == want
            counts[pl.annotator][1] += 1
    return {a: (c, n) for a, (c, n) in counts.items()}


def by_unit(labels: Iterable[PairLabel]) -> dict[tuple[str, int, int], list[PairLabel]]:
    """Labels grouped by unit, units in first-seen order."""
    out: dict[tuple[str, int, int], list[PairLabel]] = {}
    for pl in labels:
        out.setdefault(pl.unit, []).append(pl)
    return out
