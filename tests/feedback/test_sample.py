"""``feedback sample``: K responses per prompt from a checkpoint via the rollout engine."""

from __future__ import annotations

import json

import pytest

from fastrlhf.cli import main as cli_main
from fastrlhf.data.embedded import embedded_model
from fastrlhf.feedback.sample import SampleSettings, sample_items
from fastrlhf.feedback.store import all_items, connect


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return embedded_model(tmp_path_factory.mktemp("m") / "tiny", seed=0)


PROMPTS = [{"id": "q1", "prompt": "12+7="}, {"prompt": "3+4="}, {"id": "q3", "prompt": "40+9="}]


def test_sample_items_are_batch_invariant(model_dir):
    s = SampleSettings(k=3, max_new_tokens=5, batch_size=1, seed=3)
    one = sample_items(model_dir, PROMPTS, s)
    s.batch_size = 3
    three = sample_items(model_dir, PROMPTS, s)
    assert [it.responses for it in one] == [it.responses for it in three]
    assert [it.id for it in one][0] == "q1-s3" and one[1].id.startswith("p")
    assert all(len(it.responses) == 3 for it in one)
    assert one[0].settings["temperature"] == 1.0 and one[0].source == str(model_dir)
    # a random tiny model samples different continuations
    assert any(len(set(it.responses)) > 1 for it in one)
    s.seed = 4
    assert [it.responses for it in sample_items(model_dir, PROMPTS, s)] != [
        it.responses for it in one
    ]


def test_cli_sample(model_dir, tmp_path, capsys):
    db = str(tmp_path / "fb.db")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    assert cli_main(["feedback", "init", "--db", db]) == 0
    args = ["feedback", "sample", "--db", db, "--model", model_dir, "--prompts", str(prompts)]
    assert cli_main(args + ["-k", "2", "--max-new-tokens", "4"]) == 0
    assert "added 3 items" in capsys.readouterr().out
    items = all_items(connect(db))
    assert [it.prompt for it in items] == [p["prompt"] for p in PROMPTS]
    assert all(it.k == 2 for it in items)
    assert cli_main(args + ["-k", "1"]) == 2
    assert "-k must be >= 2" in capsys.readouterr().err
