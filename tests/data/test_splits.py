"""Held-out eval rows of a single-file source (disjoint from training, deterministic by
seed, described), and the malformed-row report (counts per reason, every row in a JSONL
file, pairs that become identical after tokenization skipped)."""

from __future__ import annotations

import json
import logging

import pytest

from fastrlhf.data import DataSettings, tokenize_preferences, tokenize_sft
from fastrlhf.data.embedded import embedded_tokenizer
from fastrlhf.data.loading import LOC_KEY, single_file_source, train_eval_records
from fastrlhf.errors import DataError


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _key(r: dict) -> str:
    return json.dumps({k: v for k, v in r.items() if k != LOC_KEY}, sort_keys=True)


def test_single_file_eval_split_is_held_out_and_deterministic(tmp_path):
    rows = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(40)]
    rows[7] = rows[3]  # a duplicate: may not sit on both sides
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    assert single_file_source(str(path))
    train, held, how = train_eval_records(str(path), "train", "test", 8, seed=5)
    assert len(train) == 32 and 7 <= len(held) <= 8
    assert {r[LOC_KEY] for r in train}.isdisjoint(r[LOC_KEY] for r in held)
    assert {_key(r) for r in train}.isdisjoint(_key(r) for r in held)
    assert len({r[LOC_KEY] for r in train + held}) == len(train) + len(held)
    assert "held out" in how and "data.seed=5" in how and "disjoint" in how
    again = train_eval_records(str(path), "train", "test", 8, seed=5)
    assert [r[LOC_KEY] for r in again[1]] == [r[LOC_KEY] for r in held]
    other = train_eval_records(str(path), "train", "test", 8, seed=6)[1]
    assert [r[LOC_KEY] for r in other] != [r[LOC_KEY] for r in held]
    # train keeps file order
    lines = [int(r[LOC_KEY].rsplit(":", 1)[1]) for r in train]
    assert lines == sorted(lines)


def test_sources_with_splits_keep_them(tmp_path):
    rows = [{"prompt": f"{i}=", "response": "x"} for i in range(6)]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", rows[:2])
    train, held, how = train_eval_records(str(tmp_path), "train", "test", 8, seed=0)
    assert len(train) == 6 and len(held) == 2 and "'test'" in how
    (tmp_path / "s.json").write_text(json.dumps({"train": rows, "test": rows[:1]}))
    assert not single_file_source(str(tmp_path / "s.json"))
    assert len(train_eval_records(str(tmp_path / "s.json"), "train", "test", 8, seed=0)[1]) == 1
    assert train_eval_records(str(tmp_path / "s.json"), "train", "test", 0, seed=0)[1] == []


def test_holding_out_everything_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}] * 3)
    with pytest.raises(DataError, match=r"data.num_eval=3.*3 rows"):
        train_eval_records(str(path), "train", "test", 3, seed=0)


def test_every_bad_row_goes_to_the_malformed_file(tmp_path, caplog):
    tok = embedded_tokenizer()
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "1+1=", "response": "2"},
            "{not json",
            {"prompt": "1+1="},
            {"prompt": "1+2="},
            {"prompt": "1+3=", "response": ""},
            "[1, 2]",
        ],
    )
    records, _, _ = train_eval_records(str(path), "train", "test", 0, seed=0, on_malformed="skip")
    out = tmp_path / "run" / "malformed.jsonl"
    settings = DataSettings(on_malformed="skip", malformed_file=str(out))
    with caplog.at_level(logging.WARNING, logger="fastrlhf.data"):
        seqs = tokenize_sft(records, tok, settings)
    assert len(seqs) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["where"] for r in rows] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert all(r["kind"] == "sft" and r["reason"] for r in rows)
    msg = caplog.records[-1].getMessage()
    assert "skipped 5 of 6 sft records" in msg and "2 x missing key 'response'" in msg
    assert "2 x not a JSON object" in msg and str(out) in msg
    # a resumed run tokenizes the same rows again: nothing is written twice
    tokenize_sft(records, tok, settings)
    assert len(out.read_text().splitlines()) == 5


def test_pairs_identical_after_tokenization_are_skipped(tmp_path, caplog):
    tok = embedded_tokenizer()
    long = "1" * 200
    records = [
        {"prompt": "q", "chosen": long + "2", "rejected": long + "3", LOC_KEY: "p.jsonl:1"},
        {"prompt": "q", "chosen": "a", "rejected": "b", LOC_KEY: "p.jsonl:2"},
    ]
    settings = DataSettings(max_length=40, max_prompt_length=10, on_malformed="skip")
    with caplog.at_level(logging.WARNING, logger="fastrlhf.data"):
        pairs = tokenize_preferences(records, tok, settings)
    assert [p.meta[LOC_KEY] for p in pairs] == ["p.jsonl:2"]
    assert "1 x chosen == rejected after tokenization" in caplog.text


def test_no_usable_row_is_a_data_error(tmp_path):
    tok = embedded_tokenizer()
    records = [{"prompt": "q", LOC_KEY: "f.jsonl:1"}, {"prompt": "r", LOC_KEY: "f.jsonl:2"}]
    with pytest.raises(DataError, match=r"no usable sft record among 2 \(first: f.jsonl:1"):
        tokenize_sft(records, tok, DataSettings(on_malformed="skip"))
