"""Votes from outside the web app: JSONL files and Label Studio pairwise exports.

JSONL rows (indices into the item's ``responses``):

    {"item_id", "annotator", "ranking": [best, ..., worst]}
    {"item_id", "annotator", "choice": 0 | 1 | "tie" | "cant_tell"}     (2-response items)

with optional "strength" (1-4), "flags", "note", "time_ms" and "vote_id". Without a
vote_id the id is ``import:<item_id>:<annotator>``, so importing the same file twice adds
nothing, and importing a different vote for the same (item, annotator) is an error.
Annotators that do not exist yet are created without a token (they cannot sign in).

Label Studio: the JSON export (a list of tasks) of a project using the Pairwise tag
(``<Pairwise name="pw" toName="text1,text2"/>``). Each task's ``data`` names the item by
``item_id`` (or ``id``), or by its ``prompt`` and response texts; the texts under the two
compared names are matched against the item's responses to find their indices. Each
non-cancelled annotation's pairwise result (``{"selected": "left" | "right"}``) becomes
one vote by ``completed_by`` (its email / username, or ``labelstudio:<user id>``).

Everything is imported in one transaction: a bad row (named by file and line / task)
leaves the database unchanged.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from fastrlhf.feedback.store import (
    StoreError,
    Vote,
    all_items,
    ensure_annotator,
    insert_vote,
    transaction,
)

_OPTIONAL = ("strength", "flags", "note", "time_ms", "vote_id")


def vote_from_row(row: dict, where: str, k_of: dict[str, int]) -> Vote:
    """One JSONL row -> Vote (StoreError naming ``where``)."""
    if not isinstance(row, dict):
        raise StoreError(f"{where}: a row must be a JSON object")
    for key in ("item_id", "annotator"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise StoreError(f"{where}: {key!r} must be a non-empty string")
    unknown = set(row) - {"item_id", "annotator", "ranking", "choice", *_OPTIONAL}
    if unknown:
        raise StoreError(f"{where}: unknown keys {sorted(unknown)}")
    item_id, annotator = row["item_id"], row["annotator"]
    if item_id not in k_of:
        raise StoreError(f"{where}: unknown item {item_id!r}")
    k = k_of[item_id]
    v = Vote(item_id, annotator, origin="import")
    if ("ranking" in row) == ("choice" in row):
        raise StoreError(f"{where}: give exactly one of 'ranking' and 'choice'")
    if "ranking" in row:
        v.ranking = row["ranking"]
    else:
        choice = row["choice"]
        if choice == "tie":
            v.tie = True
        elif choice in ("cant_tell", "can't tell"):
            v.cant_tell = True
        elif choice in (0, 1) and not isinstance(choice, bool):
            if k != 2:
                raise StoreError(
                    f"{where}: 'choice' is for 2-response items; {item_id!r} has {k}, "
                    "give a 'ranking'"
                )
            v.ranking = [choice, 1 - choice]
        else:
            raise StoreError(
                f"{where}: 'choice' must be 0, 1, 'tie' or 'cant_tell', got {choice!r}"
            )
    v.strength = row.get("strength")
    v.flags = row.get("flags", [])
    v.note = row.get("note")
    v.time_ms = row.get("time_ms")
    v.client_id = row.get("vote_id") or f"import:{item_id}:{annotator}"
    return v


def import_rows(conn: sqlite3.Connection, rows) -> tuple[int, int]:
    """Import (where, row) pairs atomically; returns (added, already present)."""
    k_of = {it.id: it.k for it in all_items(conn)}
    added = dup = 0
    with transaction(conn):
        for where, row in rows:
            v = vote_from_row(row, where, k_of)
            try:
                ensure_annotator(conn, v.annotator)
                _, was_dup = insert_vote(conn, v)
            except StoreError as e:
                raise type(e)(f"{where}: {e}") from None
            added += not was_dup
            dup += was_dup
    return added, dup


# ----------------------------------------------------------------------------- Label Studio


def _names(to_name) -> list[str]:
    if isinstance(to_name, str):
        return [n.strip() for n in to_name.split(",")]
    if isinstance(to_name, list):
        return [str(n) for n in to_name]
    return []


def _annotator(ann: dict) -> str:
    who = ann.get("completed_by")
    if isinstance(who, dict):
        for key in ("email", "username"):
            if who.get(key):
                return str(who[key])
        who = who.get("id")
    if who is None:
        raise StoreError("annotation has no 'completed_by'")
    return f"labelstudio:{who}"


def _find_item(data: dict, texts: list[str], items, where: str):
    key = data.get("item_id", data.get("id"))
    if key is not None:
        match = [it for it in items if it.id == str(key)]
        if not match:
            raise StoreError(f"{where}: unknown item {key!r}")
        return match[0]
    prompt = data.get("prompt")
    match = [
        it
        for it in items
        if all(t in it.responses for t in texts) and (prompt is None or it.prompt == prompt)
    ]
    if len(match) != 1:
        what = "no item" if not match else f"{len(match)} items"
        raise StoreError(f"{where}: {what} with these response texts (add 'item_id' to the data)")
    return match[0]


def labelstudio_rows(tasks, conn: sqlite3.Connection, source: str) -> list[tuple[str, dict]]:
    """A Label Studio export (list of tasks) -> (where, JSONL-style row) pairs."""
    if not isinstance(tasks, list):
        raise StoreError(f"{source}: a Label Studio export is a JSON list of tasks")
    items = all_items(conn)
    rows = []
    for n, task in enumerate(tasks):
        where = f"{source}: task {task.get('id', n) if isinstance(task, dict) else n}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise StoreError(f"{where}: a task needs a 'data' object")
        for ann in task.get("annotations") or []:
            if ann.get("was_cancelled"):
                continue
            results = [r for r in ann.get("result") or [] if r.get("type") == "pairwise"]
            if len(results) != 1:
                raise StoreError(f"{where}: expected one pairwise result, got {len(results)}")
            result = results[0]
            names = _names(result.get("to_name"))
            selected = (result.get("value") or {}).get("selected")
            if len(names) != 2 or selected not in ("left", "right"):
                raise StoreError(
                    f"{where}: pairwise result needs two to_name entries and selected "
                    f"'left'/'right', got {names} / {selected!r}"
                )
            texts = [task["data"].get(name) for name in names]
            if not all(isinstance(t, str) for t in texts):
                raise StoreError(f"{where}: data has no text under {names}")
            item = _find_item(task["data"], texts, items, where)
            try:
                left, right = (item.responses.index(t) for t in texts)
            except ValueError:
                raise StoreError(
                    f"{where}: a compared text is not a response of {item.id!r}"
                ) from None
            if item.k != 2:
                raise StoreError(f"{where}: item {item.id!r} has {item.k} responses, not 2")
            better = left if selected == "left" else right
            row = {
                "item_id": item.id,
                "annotator": _annotator(ann),
                "choice": better,
                "vote_id": f"labelstudio:{task.get('id', n)}:{ann.get('id', 0)}",
            }
            if isinstance(ann.get("lead_time"), int | float):
                row["time_ms"] = int(ann["lead_time"] * 1000)
            rows.append((where, row))
    return rows


def import_file(conn: sqlite3.Connection, path: str | Path, fmt: str = "auto") -> tuple[int, int]:
    """Import a votes JSONL or a Label Studio JSON export (``fmt``: auto by content)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if fmt == "auto":
        fmt = "labelstudio" if text.lstrip().startswith("[") else "jsonl"
    if fmt == "labelstudio":
        try:
            tasks = json.loads(text)
        except json.JSONDecodeError as e:
            raise StoreError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return import_rows(conn, labelstudio_rows(tasks, conn, str(path)))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise StoreError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return import_rows(conn, rows)
