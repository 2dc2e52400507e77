"""Simulated annotators that label through the web app's HTTP API, and a server process
to run them against (used by ``feedback demo`` and the load test).

A ``SimulatedAnnotator`` of accuracy p and tie rate t answers a pairwise item with "tie"
with probability t, otherwise picks the truly better response with probability p (and
the worse one otherwise); a ranking item gets the true ranking with probability p, else a
uniformly random other one. Two such annotators agree on a pairwise unit with probability
t^2 + (1-t)^2 (pq + (1-p)(1-q)); with t = 0 that is pq + (1-p)(1-q).

``label_queue`` retries a vote whose answer was lost (connection refused or reset while
the server restarts) with the SAME vote id, so a vote the server committed before dying
is acknowledged as a duplicate instead of being stored twice.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``fastrlhf feedback serve`` in a child process on 127.0.0.1 (start / kill / restart)."""

    def __init__(self, db: str | Path, port: int | None = None, args=(), log: str | None = None):
        self.db, self.port, self.args = str(db), port or free_port(), [str(a) for a in args]
        self.log_path = log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        import httpx

        cmd = [sys.executable, "-m", "fastrlhf", "feedback", "serve", "--db", self.db,
               "--host", "127.0.0.1", "--port", str(self.port), *self.args]  # fmt: skip
        out = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        if out is not subprocess.DEVNULL:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the server did not answer on {self.url} within {timeout:.0f}s")

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class SimulatedAnnotator:
    name: str
    token: str
    accuracy: float
    tie_rate: float = 0.0
    seed: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.seed}/{self.name}")

    def answer(self, kind: str, shown: list[str], truth: list[str]) -> dict:
        """The vote fields for responses ``shown`` (display order); ``truth`` lists the
        response texts best first."""
        if kind == "pair":
            if self.rng.random() < self.tie_rate:
                return {"choice": "tie"}
            correct = "A" if shown[0] == truth[0] else "B"
            wrong = "B" if correct == "A" else "A"
            return {"choice": correct if self.rng.random() < self.accuracy else wrong}
        ranking = [shown.index(t) for t in truth]
        if self.rng.random() >= self.accuracy:
            others = [ranking]
            while others[-1] == ranking:
                others.append(self.rng.sample(ranking, len(ranking)))
            ranking = others[-1]
        return {"ranking": ranking}


class Retry(Exception):
    pass


def _call(client, method: str, url: str, deadline: float, **kw):
    """One request, retried while the server is unreachable (until ``deadline``)."""
    import httpx

    while True:
        try:
            r = client.request(method, url, **kw)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{method} {url}: server unreachable until the deadline"
                ) from None
            time.sleep(0.05)
            continue
        if r.status_code >= 500:  # not expected; surface it
            raise RuntimeError(f"{method} {url}: {r.status_code} {r.text}")
        return r


def label_queue(
    base_url: str,
    ann: SimulatedAnnotator,
    truth: Callable[[str], list[str]],
    *,
    take_ticket: Callable[[], bool] = lambda: True,
    deadline: float | None = None,
    on_ack: Callable[[str, str], None] | None = None,
) -> list[str]:
    """Label items until the queue is empty or ``take_ticket()`` is False; returns the
    acknowledged vote ids. ``truth(item_id)`` gives the item's texts best first."""
    import httpx

    deadline = time.monotonic() + 600 if deadline is None else deadline
    acked: list[str] = []
    headers = {"Authorization": f"Bearer {ann.token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30.0) as client:
        n = 0
        while take_ticket():
            nxt = _call(client, "GET", "/api/next", deadline)
            if nxt.status_code != 200:
                raise RuntimeError(f"/api/next: {nxt.status_code} {nxt.text}")
            item = nxt.json()
            if item["done"]:
                break
            fields = ann.answer(item["kind"], item["responses"], truth(item["item_id"]))
            vote_id = f"{ann.name}-{n}-{ann.rng.getrandbits(48):012x}"
            n += 1
            # a simulated reading time (3-15 s), so votes per hour look like a person's
            time_ms = int(ann.rng.uniform(3000, 15000))
            body = {"vote_id": vote_id, "item_id": item["item_id"], **fields, "time_ms": time_ms}
            r = _call(client, "POST", "/api/votes", deadline, json=body)
            if r.status_code != 200:
                raise RuntimeError(f"/api/votes: {r.status_code} {r.text}")
            acked.append(vote_id)
            if on_ack is not None:
                on_ack(ann.name, vote_id)
    return acked
