"""Load test: 20 concurrent simulated annotators submit 2,000 votes over HTTP to a server
on 127.0.0.1 that is killed (SIGKILL) and restarted once in the middle. Every vote the
server acknowledged must be in the database exactly once, and nothing else."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from fastrlhf.feedback.simulate import (  # noqa: E402
    ServerProcess,
    SimulatedAnnotator,
    label_queue,
)
from fastrlhf.feedback.store import Item, add_annotator, add_items, connect  # noqa: E402

ANNOTATORS = 20
VOTES = 2000
TIME_LIMIT = 120.0  # seconds, for the whole run (a hang fails instead of blocking CI)


@pytest.mark.slow
def test_concurrent_votes_survive_a_server_kill(tmp_path):
    db = tmp_path / "fb.db"
    conn = connect(db, create=True)
    # 2,200 items (every tenth a ranking of 3), so no queue runs dry before 2,000 votes
    items = []
    for n in range(2200):
        worst = [f"worst {n}"] if n % 10 == 0 else []
        items.append(Item(f"i{n}", f"q{n}", [f"good {n}", f"bad {n}", *worst]))
    add_items(conn, items)
    truth = {it.id: it.responses for it in items}
    anns = [SimulatedAnnotator(f"a{i}", add_annotator(conn, f"a{i}"), 0.8, 0.1, seed=i)
            for i in range(ANNOTATORS)]  # fmt: skip

    tickets = threading.Semaphore(VOTES)
    acked: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def on_ack(name, vote_id):
        with lock:
            acked.append(vote_id)

    server = ServerProcess(db, args=["--overlap", "0.3", "--gold-rate", "0"],
                           log=str(tmp_path / "server.log"))  # fmt: skip
    server.start()
    deadline = time.monotonic() + TIME_LIMIT
    t0 = time.monotonic()

    def worker(ann):
        try:
            label_queue(server.url, ann, truth.__getitem__,
                        take_ticket=lambda: tickets.acquire(blocking=False),
                        deadline=deadline, on_ack=on_ack)  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(a,), daemon=True) for a in anns]
    for t in threads:
        t.start()
    try:
        while len(acked) < VOTES // 2 and time.monotonic() < deadline and not errors:
            time.sleep(0.02)
        acked_at_kill = len(acked)
        server.kill()
        time.sleep(0.5)  # clients see refused connections and keep retrying
        server.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
    finally:
        server.stop()
    elapsed = time.monotonic() - t0
    assert not errors, errors[0]
    assert not any(t.is_alive() for t in threads), f"not finished within {TIME_LIMIT:.0f}s"
    assert 0 < acked_at_kill < VOTES
    assert len(acked) == VOTES

    rows = connect(db).execute("SELECT client_id, item_id, annotator FROM votes").fetchall()
    ids = [r["client_id"] for r in rows]
    assert len(ids) == len(set(ids)) == VOTES  # exactly once each, nothing unacknowledged
    assert set(ids) == set(acked)
    assert len({(r["item_id"], r["annotator"]) for r in rows}) == VOTES
    print(f"{VOTES} votes from {ANNOTATORS} annotators in {elapsed:.1f}s "
          f"({VOTES / elapsed:.0f}/s), server killed after {acked_at_kill}")  # fmt: skip
