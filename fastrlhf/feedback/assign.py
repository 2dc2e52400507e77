"""Which item an annotator labels next, and in which order its responses are shown.

Policy (``AssignmentPolicy``):
- a fraction ``overlap`` of the regular (non-gold) items is given to
  ``overlap_annotators`` different annotators, the rest to one: the overlapping items are
  what agreement is measured on. Which items overlap is a fixed function of (seed, item
  id), so it does not change when the server restarts.
- gold items (those with a known ranking) are mixed into every annotator's queue so that
  about ``gold_rate`` of what each annotator labels is gold; each annotator sees each gold
  item at most once. Their accuracy on them scores the annotator.
- items someone has started are served first, so overlapping items get their second
  vote soon; otherwise each annotator walks the items in an order of their own.
- an assignment holds its slot for ``lease_seconds``; an item served but never voted on
  is then offered to someone else.
- the display order of the responses is a random permutation per (annotator, item),
  stored with the assignment (and copied into the vote), so position bias can be checked.

Everything runs inside one IMMEDIATE transaction, so two annotators asking at once never
both take an item's last slot.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import time
from dataclasses import dataclass
from functools import lru_cache

from fastrlhf.feedback.store import Item, StoreError, get_item, transaction


@dataclass
class AssignmentPolicy:
    overlap: float = 0.25  # fraction of regular items labelled by overlap_annotators people
    overlap_annotators: int = 2
    gold_rate: float = 0.1  # target share of gold items in each annotator's queue
    lease_seconds: float = 1800.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"overlap must be in [0, 1], got {self.overlap}")
        if self.overlap_annotators < 2:
            raise ValueError(f"overlap_annotators must be >= 2, got {self.overlap_annotators}")
        if not 0.0 <= self.gold_rate < 1.0:
            raise ValueError(f"gold_rate must be in [0, 1), got {self.gold_rate}")
        if self.lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {self.lease_seconds}")


@lru_cache(maxsize=1 << 20)
def _unit(*parts) -> float:
    """A uniform number in [0, 1) fixed by ``parts`` (stable across runs and machines)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def target_annotators(policy: AssignmentPolicy, item_id: str) -> int:
    """How many annotators a regular item goes to."""
    overlapping = _unit(policy.seed, "overlap", item_id) < policy.overlap
    return policy.overlap_annotators if overlapping else 1


def shown_order(policy: AssignmentPolicy, annotator: str, item_id: str, k: int) -> list[int]:
    """Display position -> response index, a permutation fixed by (seed, annotator, item)."""
    order = list(range(k))
    seed = int(_unit(policy.seed, "order", annotator, item_id) * 2**53)
    random.Random(seed).shuffle(order)
    return order


@dataclass
class Assignment:
    item: Item
    annotator: str
    shown_order: list[int]
    is_gold: bool


def _open_assignment(conn: sqlite3.Connection, annotator: str) -> sqlite3.Row | None:
    """This annotator's newest assignment without an active vote (reload, or after undo)."""
    return conn.execute(
        "SELECT a.* FROM assignments a WHERE a.annotator=? AND NOT EXISTS ("
        " SELECT 1 FROM votes v WHERE v.item_id=a.item_id AND v.annotator=a.annotator"
        " AND v.undone IS NULL) ORDER BY a.created DESC LIMIT 1",
        (annotator,),
    ).fetchone()


def _regular_candidates(
    conn: sqlite3.Connection, annotator: str, policy: AssignmentPolicy, now: float
) -> list[tuple[str, int]]:
    """(item id, slots taken) of regular items this annotator has not been served and
    that still have a free slot.

    Three flat queries and dictionary lookups (the per-item hashes are cached), not a
    correlated sub-query per item: this runs on every request for the next item.
    """
    taken = dict(
        conn.execute(
            "SELECT a.item_id, COUNT(*) FROM assignments a LEFT JOIN votes v"
            " ON v.item_id=a.item_id AND v.annotator=a.annotator AND v.undone IS NULL"
            " WHERE a.created > ? OR v.id IS NOT NULL GROUP BY a.item_id",
            (now - policy.lease_seconds,),
        ).fetchall()
    )
    mine = {
        r[0]
        for r in conn.execute("SELECT item_id FROM assignments WHERE annotator=?", (annotator,))
    }
    regular = [r[0] for r in conn.execute("SELECT id FROM items WHERE gold IS NULL ORDER BY seq")]
    return [
        (i, taken.get(i, 0))
        for i in regular
        if i not in mine and taken.get(i, 0) < target_annotators(policy, i)
    ]


def _unseen_gold(conn: sqlite3.Connection, annotator: str) -> list[str]:
    rows = conn.execute(
        "SELECT i.id FROM items i WHERE i.gold IS NOT NULL AND NOT EXISTS ("
        " SELECT 1 FROM assignments a WHERE a.item_id=i.id AND a.annotator=?)",
        (annotator,),
    ).fetchall()
    return [r["id"] for r in rows]


def next_assignment(
    conn: sqlite3.Connection, annotator: str, policy: AssignmentPolicy, now: float | None = None
) -> Assignment | None:
    """The item ``annotator`` should label now (assigning it, committed), or None if done."""
    now = time.time() if now is None else now
    # An assignment lost to a power cut is simply made again, so its commit skips the
    # fsync (WAL + NORMAL still survives the process being killed); votes keep FULL.
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        return _next(conn, annotator, policy, now)
    finally:
        conn.execute("PRAGMA synchronous=FULL")


def _next(
    conn: sqlite3.Connection, annotator: str, policy: AssignmentPolicy, now: float
) -> Assignment | None:
    with transaction(conn):
        row = _open_assignment(conn, annotator)
        if row is not None:
            return Assignment(
                get_item(conn, row["item_id"]),
                annotator,
                json.loads(row["shown_order"]),
                bool(row["is_gold"]),
            )
        regular = _regular_candidates(conn, annotator, policy, now)
        if not regular:
            return None  # gold items only score annotators who label real items
        served = conn.execute(
            "SELECT COUNT(*) AS n, COALESCE(SUM(is_gold), 0) AS g FROM assignments"
            " WHERE annotator=?",
            (annotator,),
        ).fetchone()
        gold = _unseen_gold(conn, annotator) if policy.gold_rate > 0 else []
        if gold and served["g"] < policy.gold_rate * (served["n"] + 1):
            item_id = min(gold, key=lambda i: _unit(policy.seed, "gold", annotator, i))
            is_gold = True
        else:
            # started items first (their overlap completes), then this annotator's own order
            item_id = min(
                regular, key=lambda c: (-c[1], _unit(policy.seed, "queue", annotator, c[0]))
            )[0]
            is_gold = False
        item = get_item(conn, item_id)
        order = shown_order(policy, annotator, item_id, item.k)
        conn.execute(
            "INSERT INTO assignments(item_id, annotator, shown_order, is_gold, created)"
            " VALUES (?, ?, ?, ?, ?)",
            (item_id, annotator, json.dumps(order), int(is_gold), now),
        )
        return Assignment(item, annotator, order, is_gold)


def get_assignment(conn: sqlite3.Connection, annotator: str, item_id: str) -> Assignment:
    row = conn.execute(
        "SELECT * FROM assignments WHERE annotator=? AND item_id=?", (annotator, item_id)
    ).fetchone()
    if row is None:
        raise StoreError(f"item {item_id!r} was not assigned to {annotator!r}")
    return Assignment(
        get_item(conn, item_id), annotator, json.loads(row["shown_order"]), bool(row["is_gold"])
    )


def reopen(conn: sqlite3.Connection, annotator: str, item_id: str, now: float | None = None):
    """After an undo: the item comes back first in the annotator's queue (committed)."""
    with transaction(conn):
        conn.execute(
            "UPDATE assignments SET created=? WHERE annotator=? AND item_id=?",
            (time.time() if now is None else now, annotator, item_id),
        )


def progress(conn: sqlite3.Connection, annotator: str, policy: AssignmentPolicy) -> dict:
    """{"done": active votes, "remaining": items still open to this annotator}."""
    done = conn.execute(
        "SELECT COUNT(*) AS n FROM votes WHERE annotator=? AND undone IS NULL", (annotator,)
    ).fetchone()["n"]
    remaining = len(_regular_candidates(conn, annotator, policy, time.time()))
    remaining += 0 if _open_assignment(conn, annotator) is None else 1
    return {"done": done, "remaining": remaining}
