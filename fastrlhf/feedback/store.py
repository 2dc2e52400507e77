"""The feedback database: one SQLite file (WAL) holding items, annotators, assignments, votes.

Tables
- ``items``: id, prompt, K responses (JSON list), their source model and sampling
  settings (JSON), an optional gold ranking (response indices, best first).
- ``annotators``: name and the SHA-256 of the token ``annotator add`` issued (the token
  itself is shown once and never stored). Annotators created by an import have no token
  and cannot sign in.
- ``assignments``: which annotator was served which item, in which order its responses
  were shown (``shown_order[p]`` = response index at display position p), and whether it
  was served as a gold item.
- ``votes``: one row per submitted vote. ``ranking`` holds response indices best first
  (a pairwise "A better" is the ranking [A's index, B's index]); a tie or a "can't tell"
  has no ranking. ``client_id`` is unique: a vote resubmitted with the same id returns
  the stored one instead of adding a second. Undo sets ``undone`` (the row stays, for
  audit); at most one vote per (item, annotator) is active.

Every write is committed before the function returns, with ``synchronous=FULL``: a vote
the server acknowledged survives the process being killed.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ("harmful", "unhelpful", "incorrect", "unsure", "other")
MAX_STRENGTH = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    responses TEXT NOT NULL,
    k INTEGER NOT NULL,
    gold TEXT,
    source TEXT,
    settings TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY,
    token_hash TEXT UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    item_id TEXT NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL REFERENCES annotators(name),
    shown_order TEXT NOT NULL,
    is_gold INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    PRIMARY KEY (item_id, annotator)
);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id TEXT NOT NULL UNIQUE,
    item_id TEXT NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL REFERENCES annotators(name),
    ranking TEXT,
    tie INTEGER NOT NULL DEFAULT 0,
    cant_tell INTEGER NOT NULL DEFAULT 0,
    strength INTEGER,
    flags TEXT NOT NULL DEFAULT '[]',
    note TEXT,
    time_ms INTEGER,
    shown_order TEXT,
    origin TEXT NOT NULL DEFAULT 'web',
    created REAL NOT NULL,
    undone REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS votes_active ON votes(item_id, annotator)
    WHERE undone IS NULL;
CREATE INDEX IF NOT EXISTS votes_by_annotator ON votes(annotator, id);
CREATE INDEX IF NOT EXISTS assignments_by_annotator ON assignments(annotator, created);
"""
SCHEMA_VERSION = "1"


class StoreError(ValueError):
    """Bad input to the store (unknown item, malformed vote, ...); the message says what."""


class ConflictError(StoreError):
    """The request contradicts what is stored (e.g. a second vote on the same item)."""


def connect(path: str | Path, *, create: bool = False) -> sqlite3.Connection:
    """Open the database (WAL, FULL sync, foreign keys). ``create`` makes the schema."""
    path = Path(path)
    if not create and not path.exists():
        raise StoreError(f"no feedback database at {path} (create it with `feedback init`)")
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    if create:
        conn.executescript(_SCHEMA)
        conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
        )
    else:
        row = conn.execute("SELECT name FROM sqlite_master WHERE name='votes'").fetchone()
        if row is None:
            raise StoreError(f"{path} is not a feedback database (no votes table)")
    return conn


class transaction:
    """``with transaction(conn):`` BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error).

    IMMEDIATE takes the write lock up front, so read-then-write sequences (pick the next
    item, then assign it) cannot interleave between two server threads.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


# ----------------------------------------------------------------------------- items


@dataclass
class Item:
    id: str
    prompt: str
    responses: list[str]
    gold: list[int] | None = None
    source: str | None = None
    settings: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.responses)


def check_ranking(ranking, k: int, what: str = "ranking") -> list[int]:
    """``ranking`` as a list of ints that is a permutation of 0..k-1, or StoreError."""
    if not isinstance(ranking, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) for r in ranking
    ):
        raise StoreError(f"{what} must be a list of response indices, got {ranking!r}")
    if sorted(ranking) != list(range(k)):
        raise StoreError(
            f"{what} must order every response index 0..{k - 1} exactly once, got {ranking}"
        )
    return list(ranking)


def parse_item(row: dict, where: str = "item") -> Item:
    """One items.jsonl row -> Item (StoreError naming ``where`` and the problem)."""
    if not isinstance(row, dict):
        raise StoreError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    try:
        item_id, prompt, responses = row["id"], row["prompt"], row["responses"]
    except KeyError as e:
        raise StoreError(f"{where}: missing key {e.args[0]!r}") from None
    if isinstance(item_id, int) and not isinstance(item_id, bool):
        item_id = str(item_id)
    if not isinstance(item_id, str) or not item_id:
        raise StoreError(f"{where}: 'id' must be a non-empty string, got {item_id!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise StoreError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(responses, list) or len(responses) < 2:
        raise StoreError(f"{where}: 'responses' must be a list of at least 2 strings")
    if not all(isinstance(r, str) for r in responses):
        raise StoreError(f"{where}: every response must be a string")
    gold = row.get("gold")
    if gold is not None:
        gold = check_ranking(gold, len(responses), f"{where}: 'gold'")
    settings = row.get("settings") or {}
    if not isinstance(settings, dict):
        raise StoreError(f"{where}: 'settings' must be an object")
    source = row.get("source")
    return Item(item_id, prompt, list(responses), gold, None if source is None else str(source),
                settings)  # fmt: skip


def add_items(conn: sqlite3.Connection, items: Iterable[Item]) -> tuple[int, int]:
    """Insert items; an id already stored with the same content is skipped (idempotent
    re-adds), one with different content is a ConflictError. Returns (added, skipped)."""
    added = skipped = 0
    with transaction(conn):
        for it in items:
            old = conn.execute(
                "SELECT prompt, responses, gold FROM items WHERE id=?", (it.id,)
            ).fetchone()
            gold = None if it.gold is None else json.dumps(it.gold)
            if old is not None:
                same = (old["prompt"], json.loads(old["responses"]), old["gold"]) == (
                    it.prompt,
                    it.responses,
                    gold,
                )
                if not same:
                    raise ConflictError(f"item {it.id!r} is already stored with other content")
                skipped += 1
                continue
            conn.execute(
                "INSERT INTO items(id, prompt, responses, k, gold, source, settings, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (it.id, it.prompt, json.dumps(it.responses), it.k, gold, it.source,
                 json.dumps(it.settings), time.time()),
            )  # fmt: skip
            added += 1
    return added, skipped


def _item(row: sqlite3.Row) -> Item:
    return Item(
        row["id"],
        row["prompt"],
        json.loads(row["responses"]),
        None if row["gold"] is None else json.loads(row["gold"]),
        row["source"],
        json.loads(row["settings"] or "{}"),
    )


def get_item(conn: sqlite3.Connection, item_id: str) -> Item:
    row = conn.execute("SELECT * FROM items WHERE id=?", (item_id,)).fetchone()
    if row is None:
        raise StoreError(f"unknown item {item_id!r}")
    return _item(row)


def all_items(conn: sqlite3.Connection) -> list[Item]:
    return [_item(r) for r in conn.execute("SELECT * FROM items ORDER BY seq")]


# ----------------------------------------------------------------------------- annotators


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_annotator(conn: sqlite3.Connection, name: str) -> str:
    """Create annotator ``name`` (or give an imported one a token); return the new token."""
    if not isinstance(name, str) or not name.strip() or len(name) > 64:
        raise StoreError(f"annotator name must be 1-64 characters, got {name!r}")
    token = secrets.token_urlsafe(18)
    with transaction(conn):
        row = conn.execute("SELECT token_hash FROM annotators WHERE name=?", (name,)).fetchone()
        if row is not None and row["token_hash"] is not None:
            raise ConflictError(f"annotator {name!r} already exists")
        conn.execute(
            "INSERT INTO annotators(name, token_hash, created) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET token_hash=excluded.token_hash",
            (name, hash_token(token), time.time()),
        )
    return token


def ensure_annotator(conn: sqlite3.Connection, name: str) -> None:
    """An annotator without a token (for imported votes); inside the caller's transaction."""
    if not isinstance(name, str) or not name.strip() or len(name) > 64:
        raise StoreError(f"annotator name must be 1-64 characters, got {name!r}")
    conn.execute(
        "INSERT OR IGNORE INTO annotators(name, token_hash, created) VALUES (?, NULL, ?)",
        (name, time.time()),
    )


def authenticate(conn: sqlite3.Connection, token: str, name: str | None = None) -> str:
    """The annotator whose token this is (and whose name is ``name`` when given)."""
    if not token:
        raise PermissionError("missing token")
    row = conn.execute(
        "SELECT name FROM annotators WHERE token_hash=?", (hash_token(token),)
    ).fetchone()
    if row is None or (name is not None and row["name"] != name):
        raise PermissionError("unknown annotator name or wrong token")
    return row["name"]


def annotator_names(conn: sqlite3.Connection) -> list[str]:
    return [r["name"] for r in conn.execute("SELECT name FROM annotators ORDER BY name")]


# ----------------------------------------------------------------------------- votes


@dataclass
class Vote:
    """A vote in response indices. Exactly one of: a full ranking, ``tie``, ``cant_tell``."""

    item_id: str
    annotator: str
    ranking: list[int] | None = None
    tie: bool = False
    cant_tell: bool = False
    strength: int | None = None
    flags: list[str] = field(default_factory=list)
    note: str | None = None
    time_ms: int | None = None
    shown_order: list[int] | None = None
    client_id: str | None = None
    origin: str = "web"
    id: int | None = None  # row id once stored


def check_vote(v: Vote, k: int) -> Vote:
    """Validate ``v`` against an item with ``k`` responses; StoreError says what is wrong."""
    kinds = (v.ranking is not None) + bool(v.tie) + bool(v.cant_tell)
    if kinds != 1:
        raise StoreError("a vote needs exactly one of: a ranking / choice, a tie, can't tell")
    if v.ranking is not None:
        check_ranking(v.ranking, k)
    if v.tie and k != 2:
        raise StoreError(f"a tie is a pairwise answer; item {v.item_id!r} has {k} responses")
    if v.strength is not None:
        if isinstance(v.strength, bool) or not isinstance(v.strength, int):
            raise StoreError(f"strength must be an integer 1-{MAX_STRENGTH}, got {v.strength!r}")
        if not 1 <= v.strength <= MAX_STRENGTH:
            raise StoreError(f"strength must be 1-{MAX_STRENGTH}, got {v.strength}")
    if not isinstance(v.flags, list) or any(f not in FLAGS for f in v.flags):
        raise StoreError(f"flags must be a list drawn from {list(FLAGS)}, got {v.flags!r}")
    if v.note is not None and (not isinstance(v.note, str) or len(v.note) > 10_000):
        raise StoreError("note must be a string of at most 10,000 characters")
    if v.time_ms is not None and (
        isinstance(v.time_ms, bool) or not isinstance(v.time_ms, int) or v.time_ms < 0
    ):
        raise StoreError(f"time_ms must be a non-negative integer, got {v.time_ms!r}")
    return v


def _vote(row: sqlite3.Row) -> Vote:
    return Vote(
        item_id=row["item_id"],
        annotator=row["annotator"],
        ranking=None if row["ranking"] is None else json.loads(row["ranking"]),
        tie=bool(row["tie"]),
        cant_tell=bool(row["cant_tell"]),
        strength=row["strength"],
        flags=json.loads(row["flags"]),
        note=row["note"],
        time_ms=row["time_ms"],
        shown_order=None if row["shown_order"] is None else json.loads(row["shown_order"]),
        client_id=row["client_id"],
        origin=row["origin"],
        id=row["id"],
    )


def _same(a: Vote, b: Vote) -> bool:
    keys = ("item_id", "annotator", "ranking", "tie", "cant_tell", "strength", "flags", "note")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def insert_vote(conn: sqlite3.Connection, v: Vote) -> tuple[Vote, bool]:
    """Store ``v`` inside the caller's transaction. Returns (stored vote, duplicate).

    A ``client_id`` already stored by the same annotator returns the stored vote
    (duplicate=True) when its content is the same, and is a ConflictError otherwise; a
    second active vote on the same item by the same annotator is a ConflictError.
    """
    if not v.client_id or not isinstance(v.client_id, str) or len(v.client_id) > 200:
        raise StoreError("vote_id must be a non-empty string of at most 200 characters")
    item = get_item(conn, v.item_id)
    check_vote(v, item.k)
    old = conn.execute("SELECT * FROM votes WHERE client_id=?", (v.client_id,)).fetchone()
    if old is not None:
        stored = _vote(old)
        if stored.annotator != v.annotator or not _same(stored, v):
            raise ConflictError(f"vote_id {v.client_id!r} was already used for another vote")
        return stored, True
    active = conn.execute(
        "SELECT id FROM votes WHERE item_id=? AND annotator=? AND undone IS NULL",
        (v.item_id, v.annotator),
    ).fetchone()
    if active is not None:
        raise ConflictError(f"{v.annotator!r} has already voted on item {v.item_id!r}")
    cur = conn.execute(
        "INSERT INTO votes(client_id, item_id, annotator, ranking, tie, cant_tell, strength,"
        " flags, note, time_ms, shown_order, origin, created)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (v.client_id, v.item_id, v.annotator,
         None if v.ranking is None else json.dumps(v.ranking), int(v.tie), int(v.cant_tell),
         v.strength, json.dumps(v.flags), v.note, v.time_ms,
         None if v.shown_order is None else json.dumps(v.shown_order), v.origin, time.time()),
    )  # fmt: skip
    v.id = cur.lastrowid
    return v, False


def add_vote(conn: sqlite3.Connection, v: Vote) -> tuple[Vote, bool]:
    """``insert_vote`` in its own transaction (committed on return)."""
    with transaction(conn):
        return insert_vote(conn, v)


def undo_last_vote(conn: sqlite3.Connection, annotator: str) -> Vote | None:
    """Mark ``annotator``'s latest active vote undone (committed); None if there is none."""
    with transaction(conn):
        row = conn.execute(
            "SELECT * FROM votes WHERE annotator=? AND undone IS NULL ORDER BY id DESC LIMIT 1",
            (annotator,),
        ).fetchone()
        if row is None:
            return None
        conn.execute("UPDATE votes SET undone=? WHERE id=?", (time.time(), row["id"]))
        return _vote(row)


def active_votes(conn: sqlite3.Connection) -> list[Vote]:
    """Every vote not undone, in submission order."""
    return [_vote(r) for r in conn.execute("SELECT * FROM votes WHERE undone IS NULL ORDER BY id")]


def get_meta(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return default if row is None else row["value"]
