"""Importing votes (JSONL, Label Studio) and exporting majority-vote preference pairs."""

from __future__ import annotations

import json

import pytest

from fastrlhf.cli import main as cli_main
from fastrlhf.data.embedded import embedded_tokenizer
from fastrlhf.data.formats import tokenize_preferences
from fastrlhf.data.loading import load_records
from fastrlhf.feedback.export import ExportSettings, export_rows, majority, write_rows
from fastrlhf.feedback.imports import import_file, import_rows
from fastrlhf.feedback.store import (
    ConflictError,
    Item,
    StoreError,
    active_votes,
    add_items,
    connect,
)


@pytest.fixture
def db(tmp_path):
    conn = connect(tmp_path / "fb.db", create=True)
    add_items(
        conn,
        [
            Item("pair", "1+1=", ["2", "3"], gold=[0, 1]),
            Item("rank", "2+2=", ["4", "5", "44"]),
            Item("tied", "3+3=", ["6", "06"]),
        ],
    )
    yield conn
    conn.close()


def _rows(*rows):
    return [(f"votes.jsonl:{n}", r) for n, r in enumerate(rows, 1)]


VOTES = [
    {"item_id": "pair", "annotator": "a", "choice": 0, "strength": 3},
    {"item_id": "pair", "annotator": "b", "choice": 0},
    {"item_id": "pair", "annotator": "c", "choice": 1, "strength": 2, "flags": ["unsure"]},
    {"item_id": "rank", "annotator": "a", "ranking": [2, 0, 1]},
    {"item_id": "rank", "annotator": "b", "ranking": [2, 1, 0]},
    {"item_id": "tied", "annotator": "a", "choice": "tie"},
    {"item_id": "tied", "annotator": "b", "choice": "tie"},
    {"item_id": "tied", "annotator": "c", "choice": "cant_tell"},
]


def test_majority():
    assert majority([0, 0, 1]) == 0
    assert majority([0, 1]) is None
    assert majority([2, 2, 0]) == 2
    assert majority([0, 1, 2]) is None


def test_export_hand_computed(db):
    assert import_rows(db, _rows(*VOTES)) == (8, 0)
    report = export_rows(db)
    rows = {(r["item_id"], r["chosen_index"], r["rejected_index"]): r for r in report.rows}
    # pair: a, b say 0 better (strength 3 and default 1), c says 1 better (strength 2)
    r = rows[("pair", 0, 1)]
    assert (r["prompt"], r["chosen"], r["rejected"]) == ("1+1=", "2", "3")
    assert r["agreement"] == pytest.approx(2 / 3)
    assert r["margin"] == pytest.approx((3 + 1 - 2) / 3)
    assert r["annotators"] == 3 and r["votes"] == {"chosen": 2, "rejected": 1, "tie": 0}
    # rank: (0, 1) split 1-1 -> dropped; 2 beats 0 and 1 for both annotators
    assert set(rows) == {("pair", 0, 1), ("rank", 2, 0), ("rank", 2, 1)}
    assert rows[("rank", 2, 0)]["group"] == rows[("rank", 2, 1)]["group"] == "rank"
    assert rows[("rank", 2, 1)]["agreement"] == 1.0
    assert report.dropped == {"no majority": 1, "tie": 1}
    assert report.pairs == 5
    assert [r["item_id"] for r in report.rows] == ["pair", "rank", "rank"]


def test_export_filters(db):
    import_rows(db, _rows(*VOTES))
    ties = export_rows(db, ExportSettings(ties=True)).rows
    (tie,) = [r for r in ties if r["tie"]]
    assert tie["item_id"] == "tied" and tie["margin"] == 0 and tie["annotators"] == 2
    # c's vote is flagged: without it the pair vote is unanimous
    r = export_rows(db, ExportSettings(exclude_flagged=True)).rows[0]
    assert (r["agreement"], r["annotators"]) == (1.0, 2)
    # c got the gold pair wrong (accuracy 0), a and b right; a/b have no other gold
    rep = export_rows(db, ExportSettings(min_gold_accuracy=0.5))
    assert rep.excluded_annotators == ["c"]
    assert rep.rows[0]["annotators"] == 2
    rows = export_rows(db, ExportSettings(min_agreement=0.9)).rows
    assert {r["item_id"] for r in rows} == {"rank"}


def test_export_formats_are_read_by_the_rm_data_path(db, tmp_path):
    import_rows(db, _rows(*VOTES))
    rows = export_rows(db).rows
    tok = embedded_tokenizer()
    for name in ("prefs.jsonl", "prefs.parquet", "prefs_ds"):
        write_rows(rows, tmp_path / name)
        back = load_records(str(tmp_path / name))
        assert [(r["prompt"], r["chosen"], r["rejected"]) for r in back] == [
            (r["prompt"], r["chosen"], r["rejected"]) for r in rows
        ]
        assert back[0]["votes"] == rows[0]["votes"]
        assert len(tokenize_preferences(back, tok)) == len(rows)
    with pytest.raises(ValueError, match="unknown suffix"):
        write_rows(rows, tmp_path / "prefs.csv")


def test_import_is_idempotent_and_atomic(db, tmp_path):
    path = tmp_path / "votes.jsonl"
    path.write_text("\n".join(json.dumps(v) for v in VOTES) + "\n")
    assert import_file(db, path) == (8, 0)
    assert import_file(db, path) == (0, 8)
    changed = dict(VOTES[0], choice=1)
    path.write_text(json.dumps(VOTES[1]) + "\n" + json.dumps(changed) + "\n")
    with pytest.raises(ConflictError, match="votes.jsonl:2"):
        import_file(db, path)
    assert len(active_votes(db)) == 8


@pytest.mark.parametrize(
    "row, msg",
    [
        ({"item_id": "nope", "annotator": "a", "choice": 0}, "unknown item 'nope'"),
        ({"item_id": "rank", "annotator": "a", "choice": 0}, "give a 'ranking'"),
        ({"item_id": "pair", "annotator": "a", "choice": 2}, "'choice' must be"),
        ({"item_id": "pair", "annotator": "a"}, "exactly one of"),
        ({"item_id": "rank", "annotator": "a", "ranking": [0, 1]}, "exactly once"),
        ({"item_id": "pair", "annotator": "a", "choice": 0, "strenght": 2}, "unknown keys"),
        ({"item_id": "pair", "annotator": "a", "choice": 0, "strength": 9}, "strength"),
    ],
)
def test_import_errors_name_the_line(db, row, msg):
    with pytest.raises(StoreError, match=msg) as e:
        import_rows(db, _rows({"item_id": "tied", "annotator": "z", "choice": 0}, row))
    assert "votes.jsonl:2" in str(e.value)
    assert active_votes(db) == []  # nothing of the file was kept


def _ls_task(tid, data, annotations):
    return {"id": tid, "data": data, "annotations": annotations}


def _ls_ann(aid, who, selected, cancelled=False):
    return {
        "id": aid,
        "completed_by": who,
        "was_cancelled": cancelled,
        "lead_time": 2.5,
        "result": [
            {
                "from_name": "pw",
                "to_name": ["text1", "text2"],
                "type": "pairwise",
                "value": {"selected": selected},
            }  # fmt: skip
        ],
    }


def test_label_studio_import(db, tmp_path):
    tasks = [
        # item named by id; text1 is response 1 ("3"), so "left" means response 1 is better
        _ls_task(
            1,
            {"item_id": "pair", "text1": "3", "text2": "2"},
            [
                _ls_ann(10, {"email": "x@y.z"}, "right"),
                _ls_ann(11, 7, "left"),
                _ls_ann(12, 8, "left", cancelled=True),
            ],
        ),  # fmt: skip
        # item found by prompt and texts
        _ls_task(2, {"prompt": "3+3=", "text1": "6", "text2": "06"}, [_ls_ann(13, 7, "left")]),
    ]
    path = tmp_path / "ls.json"
    path.write_text(json.dumps(tasks))
    assert import_file(db, path) == (3, 0)
    votes = {(v.item_id, v.annotator): v for v in active_votes(db)}
    assert votes[("pair", "x@y.z")].ranking == [0, 1]
    assert votes[("pair", "labelstudio:7")].ranking == [1, 0]
    assert votes[("tied", "labelstudio:7")].ranking == [0, 1]
    assert votes[("pair", "x@y.z")].time_ms == 2500 and votes[("pair", "x@y.z")].origin == "import"
    assert import_file(db, path) == (0, 3)
    path.write_text(
        json.dumps([_ls_task(3, {"text1": "6", "text2": "zzz"}, [_ls_ann(1, 1, "left")])])
    )
    with pytest.raises(StoreError, match="task 3: no item"):
        import_file(db, path)


def test_cli_import_export(db, tmp_path, capsys):
    db_path = db.execute("PRAGMA database_list").fetchone()[2]
    votes = tmp_path / "votes.jsonl"
    votes.write_text("\n".join(json.dumps(v) for v in VOTES) + "\n")
    assert cli_main(["feedback", "import-votes", "--db", db_path, str(votes)]) == 0
    out = tmp_path / "prefs.jsonl"
    assert cli_main(["feedback", "export", "--db", db_path, "-o", str(out), "--ties"]) == 0
    assert "exported 4 pairs of 5 labelled" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 4
    votes.write_text('{"item_id": "pair"}\n')
    assert cli_main(["feedback", "import-votes", "--db", db_path, str(votes)]) == 2
    assert f"{votes}:1: 'annotator'" in capsys.readouterr().err
