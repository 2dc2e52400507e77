"""The embedded default: shipped tokenizer, tiny Llama, arithmetic task."""

from __future__ import annotations

import re

import pytest
import torch

from fastrlhf.data.embedded import (
    TOKENIZER_DIR,
    ArithmeticTask,
    build_tokenizer_files,
    describe_tokenizer_files,
    embedded_model,
    embedded_tokenizer,
    forgot_carry,
    needs_carry,
    parse_prompt,
    tiny_llama_config,
)


def test_shipped_tokenizer_equals_a_fresh_build(tmp_path):
    fresh = build_tokenizer_files(tmp_path / "tok")
    assert describe_tokenizer_files(fresh) == describe_tokenizer_files(TOKENIZER_DIR)


def test_tokenizer_roundtrip_and_specials():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    assert isinstance(tok, PreTrainedTokenizerFast)
    text = "12+7=19\nWhat is 3*4? It's 12."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("19", add_special_tokens=False).input_ids == [
        tok.convert_tokens_to_ids("1"),
        tok.convert_tokens_to_ids("9"),
    ]
    assert {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id} == {0, 1, 2}
    assert len(tok) < 128
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}],
        tokenize=False,
    )
    assert chat == "<bos><|user|>1+2=<|assistant|>3<eos>"


def test_tiny_llama_size_and_embedded_model_loads(tmp_path):
    tok = embedded_tokenizer()
    config = tiny_llama_config(len(tok))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model(tmp_path / "m", seed=5)
    model = AutoModelForCausalLM.from_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    assert 300_000 < n_params < 3_000_000
    assert model.config.hidden_size == config.hidden_size
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(path))
    # same seed, same weights; another seed, other weights
    again = AutoModelForCausalLM.from_pretrained(embedded_model(tmp_path / "m2", seed=5))
    other = AutoModelForCausalLM.from_pretrained(embedded_model(tmp_path / "m3", seed=6))
    w = model.model.embed_tokens.weight
    assert torch.equal(w, again.model.embed_tokens.weight)
    assert not torch.equal(w, other.model.embed_tokens.weight)


def test_task_is_deterministic_and_well_formed():
    task = ArithmeticTask(seed=3, max_operand=49)
    assert task.sft_records(50) == ArithmeticTask(seed=3, max_operand=49).sft_records(50)
    assert task.sft_records(50) != ArithmeticTask(seed=4, max_operand=49).sft_records(50)
    for r in task.sft_records(500):
        assert int(r["response"]) >= 0
    prompts = task.rl_prompts(500)
    assert all(task.gold_score(r["prompt"], r["answer"]) == 1.0 for r in prompts)
    assert len({r["prompt"] for r in prompts}) > 200  # varied problems
    # operands zero-padded to the width of max_operand: every digit at a fixed offset
    assert all(re.fullmatch(r"\d\d[+-]\d\d=", r["prompt"]) for r in prompts)
    assert task.gold_score("07+15=", "22") == 1.0 and task.answer("40-09=") == 31
    carry = sum(task.is_carry_problem(r["prompt"]) for r in prompts) / len(prompts)
    assert 0.3 < carry < 0.6  # units sum >= 10 / borrow: a large share, not all


def test_carry_and_forgotten_carry():
    assert needs_carry(27, "+", 15) and forgot_carry(27, "+", 15) == 32
    assert needs_carry(42, "-", 15) and forgot_carry(42, "-", 15) == 37
    assert needs_carry(42, "-", 35) and forgot_carry(42, "-", 35) == 17
    assert not needs_carry(21, "+", 18) and not needs_carry(49, "-", 28)
    assert not needs_carry(9, "*", 9)
    with pytest.raises(ValueError, match="no carry"):
        forgot_carry(21, "+", 18)
    task = ArithmeticTask(seed=0)
    assert task.is_carry_problem("5+5=") and not task.is_carry_problem("10-0=")


def test_demonstrators_forget_the_carry_systematically():
    task = ArithmeticTask(seed=1, max_operand=49, carry_forget_rate=0.7, mistake_rate=0.05)
    sft = task.sft_records(4000)
    hard = [r for r in sft if task.is_carry_problem(r["prompt"])]
    easy = [r for r in sft if not task.is_carry_problem(r["prompt"])]
    forgot = 0
    for r in hard:
        a, op, b = parse_prompt(r["prompt"])
        forgot += int(r["response"]) == forgot_carry(a, op, b)
    # the typical mistake is the mode on carry problems: greedy imitation learns it
    assert 0.65 < forgot / len(hard) < 0.75
    easy_wrong = sum(task.gold_score(r["prompt"], r["response"]) == 0.0 for r in easy)
    assert 0.03 < easy_wrong / len(easy) < 0.07  # random slips only
    clean = ArithmeticTask(seed=1, max_operand=49, carry_forget_rate=0.0, mistake_rate=0.0)
    assert all(clean.gold_score(r["prompt"], r["response"]) for r in clean.sft_records(500))


def test_annotators_prefer_the_correct_answer_with_label_noise():
    task = ArithmeticTask(seed=0, max_operand=49, label_noise=0.1, carry_pair_rate=0.5)
    prefs = task.preference_records(4000)
    agree = typical = hard = 0
    for r in prefs:
        assert r["chosen"] != r["rejected"]
        assert int(r["chosen"]) >= 0 and int(r["rejected"]) >= 0
        truth = task.answer(r["prompt"])
        assert truth in (int(r["chosen"]), int(r["rejected"]))  # always one correct answer
        agree += int(r["chosen"]) == truth
        wrong = int(r["rejected"]) if int(r["chosen"]) == truth else int(r["chosen"])
        if abs(wrong - truth) == 10:  # only the forgotten carry differs in the tens alone
            a, op, b = parse_prompt(r["prompt"])
            assert needs_carry(a, op, b) and wrong == forgot_carry(a, op, b), r
        if task.is_carry_problem(r["prompt"]):
            hard += 1
            a, op, b = parse_prompt(r["prompt"])
            typical += forgot_carry(a, op, b) in (int(r["chosen"]), int(r["rejected"]))
    assert 0.87 < agree / len(prefs) < 0.93
    # on carry problems the pair shows the demonstrators' typical mistake
    assert 0.45 < typical / hard < 0.55


def test_task_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_operand"):
        ArithmeticTask(max_operand=0)
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(ops="+/")
    with pytest.raises(ValueError, match="carry_forget_rate"):
        ArithmeticTask(carry_forget_rate=1.5)
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        ArithmeticTask().answer("12+=")


def test_gold_score_is_exact():
    task = ArithmeticTask(seed=0)
    assert task.gold_score("12+7=", "19") == 1.0
    assert task.gold_score("12+7=", " 19 ") == 1.0
    assert task.gold_score("12+7=", "18") == 0.0
    assert task.gold_score("12+7=", "190") == 0.0
    assert task.gold_score("9-4=", "5") == 1.0
    assert task.gold_score("3*4=", "12") == 1.0
