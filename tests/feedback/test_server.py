"""The web app through its HTTP interface (Starlette's test client): sign-in, queue,
votes in display positions, idempotency, undo, 4xx messages, escaping."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from fastrlhf.feedback.assign import AssignmentPolicy  # noqa: E402
from fastrlhf.feedback.server import ServerSettings, create_app  # noqa: E402
from fastrlhf.feedback.store import (  # noqa: E402
    Item,
    active_votes,
    add_annotator,
    add_items,
    connect,
)

XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned=2">'


@pytest.fixture
def setup(tmp_path):
    path = tmp_path / "fb.db"
    conn = connect(path, create=True)
    add_items(
        conn,
        [
            Item("p1", "Say hi", ["hi", XSS]),
            Item("r1", "Count", ["1 2 3", "3 2 1", "1 1 1"]),
        ],
    )
    tokens = {n: add_annotator(conn, n) for n in ("ann", "bob")}
    policy = AssignmentPolicy(overlap=1.0, gold_rate=0.0)
    app = create_app(ServerSettings(str(path), policy, "Be <b>kind</b>"))
    return conn, app, tokens


def _client(app, token=None):
    c = TestClient(app)
    if token:
        c.headers["Authorization"] = f"Bearer {token}"
    return c


def test_sign_in_and_label_page_escapes_text(setup):
    conn, app, tokens = setup
    c = _client(app)
    assert "Sign in" in c.get("/").text
    r = c.post("/login", data={"name": "ann", "token": "nope"}, follow_redirects=False)
    assert r.status_code == 401 and "wrong token" in r.text
    r = c.post("/login", data={"name": "ann", "token": tokens["ann"]}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/label"
    seen = set()
    for _ in range(2):
        page = c.get("/label")
        assert page.status_code == 200
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "<script>window" not in page.text and "<img src=x" not in page.text
        assert "Be &lt;b&gt;kind&lt;/b&gt;" in page.text
        nxt = c.get("/api/next").json()
        seen.add(nxt["item_id"])
        if nxt["kind"] == "pair":
            assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page.text
            c.post("/api/votes", json={"vote_id": "v-p", "item_id": "p1", "choice": "A"})
        else:
            c.post("/api/votes", json={"vote_id": "v-r", "item_id": "r1", "ranking": [2, 0, 1]})
    assert seen == {"p1", "r1"}
    assert "All done" in c.get("/label").text
    assert c.get("/api/progress").json() == {"done": 2, "remaining": 0}


def test_votes_map_display_positions_to_responses(setup):
    conn, app, tokens = setup
    c = _client(app, tokens["bob"])
    orders = {}
    for _ in range(2):
        nxt = c.get("/api/next").json()
        item = {"p1": ["hi", XSS], "r1": ["1 2 3", "3 2 1", "1 1 1"]}[nxt["item_id"]]
        order = [item.index(t) for t in nxt["responses"]]  # display position -> index
        orders[nxt["item_id"]] = order
        if nxt["kind"] == "pair":
            body = {"choice": "B", "strength": 4, "flags": ["harmful"], "note": "x", "time_ms": 5}
        else:
            body = {"ranking": [1, 2, 0]}
        r = c.post(
            "/api/votes", json={"vote_id": nxt["item_id"], "item_id": nxt["item_id"], **body}
        )
        assert r.status_code == 200 and r.json()["duplicate"] is False
    votes = {v.item_id: v for v in active_votes(conn)}
    p = orders["p1"]
    assert votes["p1"].ranking == [p[1], p[0]]
    assert (votes["p1"].strength, votes["p1"].flags, votes["p1"].note) == (4, ["harmful"], "x")
    assert votes["p1"].shown_order == p
    r = orders["r1"]
    assert votes["r1"].ranking == [r[1], r[2], r[0]]


def test_idempotent_resubmit_and_undo(setup):
    conn, app, tokens = setup
    c = _client(app, tokens["ann"])
    item = c.get("/api/next").json()["item_id"]
    other = ({"p1", "r1"} - {item}).pop()
    r = c.post("/api/votes", json={"vote_id": "o", "item_id": other, "choice": "cant_tell"})
    assert r.status_code == 400 and "was not assigned to 'ann'" in r.json()["error"]
    body = {"vote_id": "same", "item_id": item, "choice": "cant_tell"}
    first = c.post("/api/votes", json=body).json()
    again = c.post("/api/votes", json=body).json()
    assert again["duplicate"] is True and again["id"] == first["id"]
    assert len(active_votes(conn)) == 1
    r = c.post("/api/votes", json={**body, "vote_id": "other"})
    assert r.status_code == 409 and "already voted" in r.json()["error"]
    assert c.post("/api/undo").json()["undone"] == item
    assert active_votes(conn) == []
    assert c.get("/api/next").json()["item_id"] == item  # the undone item comes back
    assert c.post("/api/undo").json()["undone"] is None


@pytest.mark.parametrize(
    "body, status, msg",
    [
        ({"vote_id": "x", "item_id": "zzz", "choice": "A"}, 404, "unknown item 'zzz'"),
        ({"vote_id": "x", "item_id": "p1", "choice": "D"}, 400, "'choice' must be"),
        ({"vote_id": "x", "item_id": "p1"}, 400, "exactly one of"),
        ({"vote_id": "x", "item_id": "p1", "choice": "A", "strength": 7}, 400, "strength"),
        ({"vote_id": "x", "item_id": "p1", "choice": "A", "flags": ["bad"]}, 400, "flags"),
        ({"vote_id": "", "item_id": "p1", "choice": "A"}, 400, "vote_id"),
        ({"vote_id": "x", "item_id": "p1", "choice": "A", "extra": 1}, 400, "unknown fields"),
        ({"vote_id": "x", "item_id": "r1", "ranking": [0, 1]}, 400, "exactly once"),
    ],
)
def test_bad_votes_get_4xx_with_message(setup, body, status, msg):
    conn, app, tokens = setup
    c = _client(app, tokens["ann"])
    c.get("/api/next")
    c.post(
        "/api/votes",
        json={
            "vote_id": "first",
            "item_id": c.get("/api/next").json()["item_id"],
            "choice": "cant_tell",
        },
    )
    c.get("/api/next")  # both items are now assigned
    r = c.post("/api/votes", json=body)
    assert r.status_code == status, r.text
    assert msg in r.json()["error"]


def test_auth_and_malformed_requests(setup):
    conn, app, tokens = setup
    c = _client(app)
    assert c.get("/api/next").status_code == 401
    assert _client(app, "wrong").get("/api/next").status_code == 401
    assert c.get("/label", follow_redirects=False).status_code == 303
    r = c.post("/api/login", json={"name": "ann", "token": tokens["bob"]})
    assert r.status_code == 401
    assert c.post("/api/login", json={"name": "ann", "token": tokens["ann"]}).status_code == 200
    assert c.get("/api/next").status_code == 200  # the cookie signs in
    r = c.post("/api/votes", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]
    assert c.get("/static/app.js").status_code == 200
    assert c.get("/static/nope.js").status_code == 404
