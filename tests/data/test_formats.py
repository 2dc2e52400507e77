"""Record loading and tokenization: formats, chat templates, HH-RLHF, malformed rows."""

from __future__ import annotations

import json
import logging

import pytest

from fastrlhf.data import (
    LOC_KEY,
    DataSettings,
    MalformedRecordError,
    load_records,
    split_hh_transcripts,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)
from fastrlhf.data.embedded import embedded_tokenizer
from fastrlhf.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# ----------------------------------------------------------------------------- loading


def test_jsonl_bad_lines_are_reported_with_file_and_line(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, "", "{not json", '"a string"'])
    with caplog.at_level(logging.WARNING, logger="fastrlhf.data"):
        records = load_records(str(path), on_malformed="skip")
    assert [r["prompt"] for r in records] == ["a"]
    assert records[0][LOC_KEY] == f"{path}:1"
    assert "skipped 2" in caplog.text and f"{path}:3" in caplog.text and f"{path}:4" in caplog.text
    with pytest.raises(MalformedRecordError, match=f"{path}:3"):
        load_records(str(path))


def test_parquet_json_and_split_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    got = load_records(str(tmp_path / "train.parquet"))
    assert [r["answer"] for r in got] == ["1", "2", "3", "4", "5"]
    assert got[2][LOC_KEY].endswith("train.parquet:row 2")
    # a folder with <split>.jsonl / <split>.parquet files
    _write_jsonl(tmp_path / "test.jsonl", rows[:2])
    assert len(load_records(str(tmp_path), split="test")) == 2
    assert len(load_records(str(tmp_path), split="train")) == 5
    (tmp_path / "d.json").write_text(json.dumps({"train": rows, "test": rows[:1]}))
    assert len(load_records(str(tmp_path / "d.json"), split="test")) == 1
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_datasets_save_to_disk_folders(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 3
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    DatasetDict(
        {"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}
    ).save_to_disk(str(tmp_path / "dict"))
    assert len(load_records(str(tmp_path / "single"))) == 3
    assert len(load_records(str(tmp_path / "dict"), split="test")) == 1
    assert load_records(str(tmp_path / "dict"))[0]["chosen"] == "2"
    with pytest.raises(DataError, match="validation"):
        load_records(str(tmp_path / "dict"), split="validation")


def test_embedded_sources():
    train = load_records("embedded:sft?n=20&seed=1")
    test = load_records("embedded:sft?n=20&seed=1", split="test")
    assert len(train) == 20 and train != test
    assert train == load_records("embedded:sft?n=20&seed=1")
    prefs = load_records("embedded:preference?n=5&max_operand=9")
    assert set(prefs[0]) == {"prompt", "chosen", "rejected", LOC_KEY}
    assert "answer" in load_records("embedded:rl?n=3")[0]
    with pytest.raises(ValueError, match="kind"):
        load_records("embedded:nope")


# ----------------------------------------------------------------------------- SFT


def test_sft_text_records(tok):
    seqs = tokenize_sft([{"prompt": "12+7=", "response": "19"}], tok)
    (s,) = seqs
    assert s.input_ids == [tok.bos_token_id] + _ids(tok, "12+7=") + _ids(tok, "19") + [
        tok.eos_token_id
    ]
    assert s.loss_mask == [0] * 6 + [1] * 3


def test_sft_chat_messages_use_the_template(tok):
    msgs = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]
    (s,) = tokenize_sft([{"messages": msgs}], tok)
    assert tok.decode(s.input_ids) == "<bos><|user|>1+2=<|assistant|>3<eos>"
    response = [t for t, m in zip(s.input_ids, s.loss_mask) if m]
    assert tok.decode(response) == "3<eos>"


def test_sft_messages_without_a_template_use_a_plain_transcript(tok):
    plain = embedded_tokenizer()
    plain.chat_template = None
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    (s,) = tokenize_sft([{"messages": msgs}], plain)
    assert plain.decode(s.input_ids) == "<bos>\n\nUser: hi\n\nAssistant: yes<eos>"
    response = [t for t, m in zip(s.input_ids, s.loss_mask) if m]
    assert plain.decode(response) == " yes<eos>"


def test_truncation_sides(tok):
    record = {"prompt": "abcdefghij", "response": "0123456789"}
    left = DataSettings(max_length=10, max_prompt_length=5, truncation="left")
    (s,) = tokenize_sft([record], tok, left)
    assert tok.decode(s.input_ids) == "<bos>ghij01234"  # BOS kept, end of prompt kept
    right = DataSettings(
        max_length=8, max_prompt_length=4, truncation="right", response_truncation="left"
    )
    (s,) = tokenize_sft([record], tok, right)
    assert tok.decode(s.input_ids) == "<bos>abc789<eos>"
    assert len(s.input_ids) == 8


def test_malformed_sft_rows_are_counted_and_located(tok, caplog):
    records = [
        {"prompt": "1+1=", "response": "2", LOC_KEY: "f.jsonl:1"},
        {"prompt": "1+1=", LOC_KEY: "f.jsonl:2"},
        {"prompt": "1+1=", "response": "", LOC_KEY: "f.jsonl:3"},
        {"prompt": 5, "response": "2", LOC_KEY: "f.jsonl:4"},
        {"messages": [{"role": "user", "content": ["x"]}], LOC_KEY: "f.jsonl:5"},
    ]
    with caplog.at_level(logging.WARNING, logger="fastrlhf.data"):
        seqs = tokenize_sft(records, tok, DataSettings(on_malformed="skip"))
    assert len(seqs) == 1
    assert "skipped 4 of 5 sft records" in caplog.text
    assert "1 x missing key 'response'" in caplog.text
    assert "first rows: f.jsonl:2, f.jsonl:3, f.jsonl:4, f.jsonl:5" in caplog.text
    with pytest.raises(MalformedRecordError, match="f.jsonl:2"):
        tokenize_sft(records, tok, DataSettings(on_malformed="error"))


# ----------------------------------------------------------------------------- preferences


HH_CHOSEN = (
    "\n\nHuman: What is 2+2?\n\nAssistant: Let me think.\n\nHuman: Well?\n\nAssistant: It is 4."
)
HH_REJECTED = (
    "\n\nHuman: What is 2+2?\n\nAssistant: Let me think.\n\nHuman: Well?"
    "\n\nAssistant: It is 5, I think."
)


def test_hh_transcripts_split_at_the_last_shared_assistant_turn(tok):
    prompt, chosen, rejected = split_hh_transcripts(HH_CHOSEN, HH_REJECTED)
    assert prompt.endswith("\n\nHuman: Well?\n\nAssistant:")
    assert prompt.count("\n\nAssistant:") == 2
    assert (chosen, rejected) == (" It is 4.", " It is 5, I think.")
    (pair,) = tokenize_preferences([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}], tok)
    assert tok.decode(pair.prompt_ids, skip_special_tokens=True) == prompt
    assert tok.decode(pair.chosen_ids) == " It is 4.<eos>"
    assert tok.decode(pair.rejected_ids) == " It is 5, I think.<eos>"


def test_preference_text_messages_and_repeated_prompt(tok):
    records = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "1+1=", "chosen": "1+1=2", "rejected": "1+1=3"},  # prompt repeated
        {
            "prompt": "1+1=",
            "chosen": [
                {"role": "user", "content": "1+1="},
                {"role": "assistant", "content": "2"},
            ],
            "rejected": [
                {"role": "user", "content": "1+1="},
                {"role": "assistant", "content": "3"},
            ],
        },
    ]
    a, b, c = tokenize_preferences(records, tok)
    assert a.prompt_ids == b.prompt_ids == [tok.bos_token_id] + _ids(tok, "1+1=")
    assert a.chosen_ids == b.chosen_ids == _ids(tok, "2") + [tok.eos_token_id]
    assert a.rejected_ids == b.rejected_ids == _ids(tok, "3") + [tok.eos_token_id]
    assert tok.decode(c.prompt_ids) == "<bos><|user|>1+1=<|assistant|>"
    assert tok.decode(c.chosen_ids) == "2<eos>" and tok.decode(c.rejected_ids) == "3<eos>"


def test_malformed_preferences(tok, caplog):
    records = [
        {"prompt": "q", "chosen": "a", "rejected": "a", LOC_KEY: "p.jsonl:1"},
        {"prompt": "q", "chosen": "", "rejected": "b", LOC_KEY: "p.jsonl:2"},
        {"prompt": "q", "chosen": "a", LOC_KEY: "p.jsonl:3"},
        {"chosen": "\n\nHuman: x", "rejected": "\n\nHuman: y", LOC_KEY: "p.jsonl:4"},
        {"prompt": "q", "chosen": 1, "rejected": "b", LOC_KEY: "p.jsonl:5"},
        {"prompt": "q", "chosen": "a", "rejected": "b", LOC_KEY: "p.jsonl:6"},
    ]
    with caplog.at_level(logging.WARNING, logger="fastrlhf.data"):
        pairs = tokenize_preferences(records, tok)
    assert len(pairs) == 1 and pairs[0].meta[LOC_KEY] == "p.jsonl:6"
    assert "skipped 5 of 6 preference records" in caplog.text
    for reason in ("chosen == rejected", "'chosen' response is empty", "missing key 'rejected'"):
        assert f"1 x {reason}" in caplog.text
    assert "\n" not in caplog.records[-1].getMessage()
    with pytest.raises(MalformedRecordError, match="p.jsonl:1.*chosen == rejected"):
        tokenize_preferences(records, tok, DataSettings(on_malformed="error"))


# ----------------------------------------------------------------------------- prompts


def test_prompts_keep_text_and_answer(tok):
    records = [
        {"prompt": "3+4=", "answer": "7"},
        {"prompt": "5-1=", "answer": 4},
        {"messages": [{"role": "user", "content": "2*3="}]},
    ]
    a, b, c = tokenize_prompts(records, tok)
    assert a.text == "3+4=" and a.answer == "7"
    assert a.input_ids == [tok.bos_token_id] + _ids(tok, "3+4=")
    assert b.answer == "4"
    assert c.answer is None and tok.decode(c.input_ids) == "<bos><|user|>2*3=<|assistant|>"
    always = tokenize_prompts(records[:1], tok, DataSettings(chat_template="always"))
    assert tok.decode(always[0].input_ids) == "<bos><|user|>3+4=<|assistant|>"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"truncation": "middle"}, "truncation"),
        ({"on_malformed": "ignore"}, "on_malformed"),
        ({"max_length": 10, "max_prompt_length": 10}, "max_prompt_length"),
        ({"chat_template": "sometimes"}, "chat_template"),
    ],
)
def test_settings_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataSettings(**kwargs)
