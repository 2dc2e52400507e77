"""The feedback store and the assignment policy: schema, idempotent votes, undo, queue."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fastrlhf.cli import main as cli_main
from fastrlhf.feedback.assign import (
    AssignmentPolicy,
    get_assignment,
    next_assignment,
    progress,
    reopen,
    shown_order,
    target_annotators,
)
from fastrlhf.feedback.store import (
    ConflictError,
    Item,
    StoreError,
    Vote,
    active_votes,
    add_annotator,
    add_items,
    add_vote,
    authenticate,
    connect,
    parse_item,
    undo_last_vote,
)


@pytest.fixture
def db(tmp_path):
    conn = connect(tmp_path / "fb.db", create=True)
    yield conn
    conn.close()


def _items(n, k=2, gold_every=0):
    out = []
    for i in range(n):
        gold = list(range(k)) if gold_every and i % gold_every == 0 else None
        out.append(Item(f"i{i}", f"prompt {i}", [f"r{i}.{j}" for j in range(k)], gold))
    return out


def test_wal_and_schema(db):
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"items", "annotators", "assignments", "votes", "meta"} <= tables


def test_missing_db_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="feedback init"):
        connect(tmp_path / "nope.db")


def test_add_items_idempotent_and_conflict(db):
    assert add_items(db, _items(3)) == (3, 0)
    assert add_items(db, _items(3)) == (0, 3)
    changed = Item("i0", "prompt 0", ["other", "text"])
    with pytest.raises(ConflictError, match="'i0'"):
        add_items(db, [changed])


@pytest.mark.parametrize(
    "row, msg",
    [
        ({"prompt": "p", "responses": ["a", "b"]}, "missing key 'id'"),
        ({"id": "x", "prompt": "p", "responses": ["a"]}, "at least 2"),
        ({"id": "x", "prompt": "", "responses": ["a", "b"]}, "'prompt'"),
        ({"id": "x", "prompt": "p", "responses": ["a", 3]}, "must be a string"),
        ({"id": "x", "prompt": "p", "responses": ["a", "b"], "gold": [0, 0]}, "exactly once"),
    ],
)
def test_parse_item_errors(row, msg):
    with pytest.raises(StoreError, match=msg):
        parse_item(row, "items.jsonl:3")


def test_tokens(db):
    token = add_annotator(db, "ann")
    assert authenticate(db, token) == "ann"
    assert authenticate(db, token, "ann") == "ann"
    with pytest.raises(PermissionError):
        authenticate(db, token, "other")
    with pytest.raises(PermissionError):
        authenticate(db, "wrong")
    with pytest.raises(ConflictError):
        add_annotator(db, "ann")
    # the token itself is never stored
    assert token not in json.dumps([list(r) for r in db.execute("SELECT * FROM annotators")])


def test_vote_idempotent_by_client_id(db):
    add_items(db, _items(2))
    add_annotator(db, "a")
    v = Vote("i0", "a", ranking=[1, 0], strength=3, client_id="c1")
    stored, dup = add_vote(db, v)
    assert not dup and stored.id is not None
    again, dup = add_vote(db, Vote("i0", "a", ranking=[1, 0], strength=3, client_id="c1"))
    assert dup and again.id == stored.id
    assert len(active_votes(db)) == 1
    with pytest.raises(ConflictError, match="already used"):
        add_vote(db, Vote("i0", "a", ranking=[0, 1], client_id="c1"))
    with pytest.raises(ConflictError, match="already voted"):
        add_vote(db, Vote("i0", "a", ranking=[0, 1], client_id="c2"))


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(item_id="nope", ranking=[0, 1]), "unknown item"),
        (dict(ranking=[0, 0]), "exactly once"),
        (dict(ranking=[0, 1], tie=True), "exactly one"),
        (dict(), "exactly one"),
        (dict(ranking=[0, 1], strength=5), "strength"),
        (dict(ranking=[0, 1], flags=["rude"]), "flags"),
    ],
)
def test_malformed_votes(db, kwargs, msg):
    add_items(db, _items(1))
    add_annotator(db, "a")
    kwargs = {"item_id": "i0", **kwargs}
    with pytest.raises(StoreError, match=msg):
        add_vote(db, Vote(annotator="a", client_id="x", **kwargs))


def test_tie_only_for_pairs(db):
    add_items(db, _items(1, k=3))
    add_annotator(db, "a")
    with pytest.raises(StoreError, match="pairwise"):
        add_vote(db, Vote("i0", "a", tie=True, client_id="x"))


def test_undo_marks_latest_and_allows_revote(db):
    add_items(db, _items(2))
    add_annotator(db, "a")
    add_vote(db, Vote("i0", "a", ranking=[0, 1], client_id="c1"))
    add_vote(db, Vote("i1", "a", ranking=[0, 1], client_id="c2"))
    undone = undo_last_vote(db, "a")
    assert undone.client_id == "c2"
    assert [v.client_id for v in active_votes(db)] == ["c1"]
    add_vote(db, Vote("i1", "a", ranking=[1, 0], client_id="c3"))
    assert [v.client_id for v in active_votes(db)] == ["c1", "c3"]
    assert db.execute("SELECT COUNT(*) FROM votes").fetchone()[0] == 3  # audit trail kept


def test_votes_survive_reopen(tmp_path):
    path = tmp_path / "fb.db"
    conn = connect(path, create=True)
    add_items(conn, _items(1))
    add_annotator(conn, "a")
    add_vote(conn, Vote("i0", "a", ranking=[1, 0], client_id="c1"))
    # a second connection (another process after a restart) sees the committed vote
    other = connect(path)
    assert [v.ranking for v in active_votes(other)] == [[1, 0]]


def test_overlap_fraction_and_order_are_stable():
    policy = AssignmentPolicy(overlap=0.3, seed=1)
    targets = [target_annotators(policy, f"i{i}") for i in range(2000)]
    assert abs(targets.count(2) / 2000 - 0.3) < 0.04
    assert targets == [target_annotators(policy, f"i{i}") for i in range(2000)]
    orders = Counter(tuple(shown_order(policy, f"a{j}", "item", 2)) for j in range(400))
    assert 150 < orders[(0, 1)] < 250  # both orders occur, about equally


def _label_all(db, names, policy):
    served = {n: [] for n in names}
    active = list(names)
    while active:
        for n in list(active):
            a = next_assignment(db, n, policy)
            if a is None:
                active.remove(n)
                continue
            served[n].append(a)
            ranking = list(a.shown_order)
            add_vote(db, Vote(a.item.id, n, ranking=ranking, client_id=f"{n}-{a.item.id}"))
    return served


def test_assignment_policy(db):
    add_items(db, _items(200, gold_every=10))  # 20 gold, 180 regular items
    names = ["a", "b", "c"]
    for n in names:
        add_annotator(db, n)
    policy = AssignmentPolicy(overlap=0.5, overlap_annotators=2, gold_rate=0.1, seed=3)
    served = _label_all(db, names, policy)
    per_item = Counter(v.item_id for v in active_votes(db))
    regular = [f"i{i}" for i in range(200) if i % 10]
    # every regular item got exactly its target number of annotators
    for item_id in regular:
        assert per_item[item_id] == target_annotators(policy, item_id), item_id
    overlapped = sum(per_item[i] == 2 for i in regular) / len(regular)
    assert 0.35 < overlapped < 0.65
    for n in names:
        items = [a.item.id for a in served[n]]
        assert len(items) == len(set(items))  # nobody sees an item twice
        gold_share = sum(a.is_gold for a in served[n]) / len(served[n])
        assert 0.05 < gold_share <= 0.12, (n, gold_share)
        assert progress(db, n, policy) == {"done": len(served[n]), "remaining": 0}
    # the stored display order is the one the policy gives
    a0 = served["a"][0]
    assert get_assignment(db, "a", a0.item.id).shown_order == a0.shown_order


def test_reload_returns_same_item_and_undo_brings_it_back(db):
    add_items(db, _items(5))
    add_annotator(db, "a")
    policy = AssignmentPolicy(gold_rate=0.0)
    first = next_assignment(db, "a", policy)
    assert next_assignment(db, "a", policy).item.id == first.item.id  # page reload
    add_vote(db, Vote(first.item.id, "a", ranking=[0, 1], client_id="c1"))
    second = next_assignment(db, "a", policy)
    assert second.item.id != first.item.id
    undone = undo_last_vote(db, "a")
    reopen(db, "a", undone.item_id)
    assert next_assignment(db, "a", policy).item.id == first.item.id


def test_lease_expiry_frees_the_slot(db):
    add_items(db, _items(1))
    add_annotator(db, "a")
    add_annotator(db, "b")
    policy = AssignmentPolicy(overlap=0.0, gold_rate=0.0, lease_seconds=60)
    assert next_assignment(db, "a", policy, now=1000.0) is not None
    assert next_assignment(db, "b", policy, now=1030.0) is None  # a still holds it
    assert next_assignment(db, "b", policy, now=1100.0).item.id == "i0"


def test_cli_init_add_items_annotator(tmp_path, capsys):
    db = str(tmp_path / "fb.db")
    items = tmp_path / "items.jsonl"
    rows = [{"id": "x1", "prompt": "p", "responses": ["a", "b"], "gold": [1, 0]}]
    items.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert cli_main(["feedback", "init", "--db", db]) == 0
    assert cli_main(["feedback", "add-items", "--db", db, str(items)]) == 0
    assert "added 1 items" in capsys.readouterr().out
    assert cli_main(["feedback", "annotator", "add", "--db", db, "ann"]) == 0
    token = capsys.readouterr().out.strip().split()[-1]
    assert authenticate(connect(db), token, "ann") == "ann"
    items.write_text('{"id": "x2", "prompt": "p"}\n')
    assert cli_main(["feedback", "add-items", "--db", db, str(items)]) == 2
    assert f"{items}:1: missing key 'responses'" in capsys.readouterr().err
