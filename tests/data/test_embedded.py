"""The embedded default: shipped tokenizer, tiny Llama, arithmetic task."""

from __future__ import annotations

import torch

from fastrlhf.data.embedded import (
    TOKENIZER_DIR,
    ArithmeticTask,
    build_tokenizer_files,
    describe_tokenizer_files,
    embedded_model,
    embedded_tokenizer,
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
    task = ArithmeticTask(seed=3)
    assert task.sft_records(50) == ArithmeticTask(seed=3).sft_records(50)
    assert task.sft_records(50) != ArithmeticTask(seed=4).sft_records(50)
    sft = task.sft_records(2000)
    wrong = sum(task.gold_score(r["prompt"], r["response"]) == 0.0 for r in sft)
    assert 0.2 < wrong / len(sft) < 0.3  # noisy demonstrations, mistake_rate 0.25
    for r in sft:
        assert int(r["response"]) >= 0
    prompts = task.rl_prompts(500)
    assert all(task.gold_score(r["prompt"], r["answer"]) == 1.0 for r in prompts)
    assert len({r["prompt"] for r in prompts}) > 200  # varied problems


def test_preferences_prefer_the_closer_answer_with_label_noise():
    task = ArithmeticTask(seed=0, label_noise=0.1)
    prefs = task.preference_records(3000)
    agree = 0
    for r in prefs:
        assert r["chosen"] != r["rejected"]
        truth = task.answer(r["prompt"])
        d_chosen = abs(int(r["chosen"]) - truth)
        d_rejected = abs(int(r["rejected"]) - truth)
        agree += d_chosen < d_rejected or (d_chosen == d_rejected)
    assert 0.85 < agree / len(prefs) < 0.95


def test_gold_score_is_exact():
    task = ArithmeticTask(seed=0)
    assert task.gold_score("12+7=", "19") == 1.0
    assert task.gold_score("12+7=", " 19 ") == 1.0
    assert task.gold_score("12+7=", "18") == 0.0
    assert task.gold_score("12+7=", "190") == 0.0
    assert task.gold_score("9-4=", "5") == 1.0
    assert task.gold_score("3*4=", "12") == 1.0
