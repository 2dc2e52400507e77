"""Agreement statistics: hand-computed small cases, the libraries on the same labels, and
simulated annotators whose agreement theory predicts."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from fastrlhf.cli import main as cli_main
from fastrlhf.feedback.agreement import agreement_stats, kappa_heatmap
from fastrlhf.feedback.imports import import_rows
from fastrlhf.feedback.store import Item, add_items, connect


@pytest.fixture
def db(tmp_path):
    conn = connect(tmp_path / "fb.db", create=True)
    yield conn
    conn.close()


def _vote_rows(votes):
    """votes: (item, annotator, choice-or-ranking)"""
    rows = []
    for n, (item, ann, v) in enumerate(votes, 1):
        key = "ranking" if isinstance(v, list) else "choice"
        rows.append((f"v:{n}", {"item_id": item, "annotator": ann, key: v}))
    return rows


def test_two_annotators_hand_computed(db):
    add_items(db, [Item(f"u{i}", "p", ["x", "y"]) for i in range(4)])
    a, b = [0, 0, 1, 1], [0, 1, 1, 1]
    votes = [(f"u{i}", "a", a[i]) for i in range(4)] + [(f"u{i}", "b", b[i]) for i in range(4)]
    import_rows(db, _vote_rows(votes))
    s = agreement_stats(db, min_overlap=4)
    # 3 of 4 units agree
    assert s["raw_agreement"] == pytest.approx(0.75)
    # Cohen: p_o = 3/4, p_e = 1/2 * 1/4 + 1/2 * 3/4 = 1/2 -> kappa = 1/2
    assert s["cohen_kappa"] == [{"a": "a", "b": "b", "kappa": pytest.approx(0.5), "n": 4}]
    # Fleiss: mean P_i = 3/4, p = (3/8, 5/8), P_e = 34/64 -> (3/4 - 34/64) / (30/64) = 7/15
    assert s["fleiss_kappa"] == pytest.approx(7 / 15)
    assert (s["fleiss_units"], s["fleiss_raters"]) == (4, 2)
    # Krippendorff nominal: D_o = 2/8, D_e = 2 * 3 * 5 / (8 * 7) -> alpha = 1 - 14/30 = 8/15
    assert s["krippendorff_alpha"] == pytest.approx(8 / 15)
    ann = {x["name"]: x for x in s["annotators"]}
    assert ann["a"]["agreement_with_majority"] == pytest.approx(0.75)
    assert ann["a"]["gold_accuracy"] is None and ann["a"]["votes"] == 4


def test_json_keys_and_cli(db, tmp_path, capsys):
    add_items(db, [Item("g", "p", ["x", "y"], gold=[1, 0]), Item("u", "p", ["x", "y"])])
    import_rows(db, _vote_rows([("g", "a", 1), ("g", "b", 0), ("u", "a", "tie"), ("u", "b", 0)]))
    db_path = db.execute("PRAGMA database_list").fetchone()[2]
    png = tmp_path / "kappa.png"
    args = ["feedback", "agreement", "--db", db_path, "--json", "--min-overlap", "1"]
    assert cli_main(args + ["--heatmap", str(png)]) == 0
    s = json.loads(capsys.readouterr().out)
    for key in ("raw_agreement", "fleiss_kappa", "krippendorff_alpha", "cohen_kappa"):
        assert key in s
    assert set(s["cohen_kappa"][0]) == {"a", "b", "kappa", "n"}
    ann = {a["name"]: a for a in s["annotators"]}
    assert {"name", "votes", "agreement_with_majority", "gold_accuracy"} <= set(ann["a"])
    assert ann["a"]["gold_accuracy"] == 1.0 and ann["b"]["gold_accuracy"] == 0.0
    assert ann["a"]["tie_rate"] == 0.5 and s["tie_rate"] == 0.25
    assert s["raw_agreement"] == 0.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["feedback", "agreement", "--db", db_path]) == 0
    assert "Krippendorff" in capsys.readouterr().out


def test_rankings_and_missing_labels_match_the_libraries(db):
    """Random rankings of 3 responses by 4 annotators, some items unlabelled by some:
    the statistics equal the libraries called on labels built here independently."""
    import krippendorff
    from sklearn.metrics import cohen_kappa_score
    from statsmodels.stats.inter_rater import fleiss_kappa

    rng = random.Random(0)
    add_items(db, [Item(f"i{n}", "p", ["x", "y", "z"]) for n in range(60)])
    names = ["w", "x", "y", "z"]
    votes, lab = [], {}
    for n in range(60):
        who = names if n % 3 else rng.sample(names, 2)
        for a in who:
            r = rng.sample([0, 1, 2], 3) if rng.random() < 0.5 else [0, 1, 2]
            votes.append((f"i{n}", a, r))
            pos = {x: p for p, x in enumerate(r)}
            for i, j in ((0, 1), (0, 2), (1, 2)):
                lab[(a, (n, i, j))] = 0 if pos[i] < pos[j] else 1
    import_rows(db, _vote_rows(votes))
    s = agreement_stats(db, min_overlap=5)
    units = sorted({u for _, u in lab})
    for c in s["cohen_kappa"]:
        shared = [u for u in units if (c["a"], u) in lab and (c["b"], u) in lab]
        want = cohen_kappa_score(
            [lab[(c["a"], u)] for u in shared], [lab[(c["b"], u)] for u in shared],
            labels=[0, 1, 2],
        )  # fmt: skip
        assert c["n"] == len(shared) and c["kappa"] == pytest.approx(want)
    assert len(s["cohen_kappa"]) == 6
    full = [u for u in units if all((a, u) in lab for a in names)]
    table = [[sum(lab[(a, u)] == c for a in names) for c in range(3)] for u in full]
    assert s["fleiss_kappa"] == pytest.approx(fleiss_kappa(np.array(table)))
    data = np.array([[lab.get((a, u), np.nan) for u in units] for a in names], dtype=float)
    want = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
    assert s["krippendorff_alpha"] == pytest.approx(want)
    agree = total = 0
    for u in units:
        ls = [lab[(a, u)] for a in names if (a, u) in lab]
        for p in range(len(ls)):
            for q in range(p + 1, len(ls)):
                agree += ls[p] == ls[q]
                total += 1
    assert s["raw_agreement"] == pytest.approx(agree / total)


def test_simulated_annotators_agree_as_theory_says(db):
    """Annotators of accuracy p, q on a binary choice agree with prob pq + (1-p)(1-q)."""
    rng = random.Random(1)
    acc = {"a": 0.9, "b": 0.8, "c": 0.7}
    n = 1500
    add_items(db, [Item(f"i{k}", "p", ["good", "bad"], gold=[0, 1]) for k in range(n)])
    votes = [(f"i{k}", a, 0 if rng.random() < p else 1) for k in range(n) for a, p in acc.items()]
    import_rows(db, _vote_rows(votes))
    s = agreement_stats(db)
    assert [c["n"] for c in s["cohen_kappa"]] == [n, n, n]
    pairs = [("a", "b"), ("a", "c"), ("b", "c")]
    expected = np.mean([acc[x] * acc[y] + (1 - acc[x]) * (1 - acc[y]) for x, y in pairs])
    sd = math.sqrt(expected * (1 - expected) / n)  # 3 correlated pairs per item: loose bound
    assert abs(s["raw_agreement"] - expected) < 4 * sd
    ann = {x["name"]: x for x in s["annotators"]}
    for a, p in acc.items():
        assert abs(ann[a]["gold_accuracy"] - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_empty_db_and_heatmap(db, tmp_path):
    s = agreement_stats(db)
    assert s["raw_agreement"] is None and s["fleiss_kappa"] is None
    assert s["krippendorff_alpha"] is None and s["cohen_kappa"] == []
    assert kappa_heatmap(s, tmp_path / "h.png").exists()
