"""Greedy generation scored by a gold checker (evaluation only: the demo's table)."""

from __future__ import annotations

from typing import Any

import torch

from fastrlhf.config import DataConfig
from fastrlhf.trainers.records import data_settings
from fastrlhf.trainers.reporting import progress


def greedy_generate(
    policy,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 64,
    show_progress: bool = True,
) -> list[list[int]]:
    """Greedy continuations (token ids, stopped at EOS) of each prompt, via HF ``generate``
    on the policy's causal LM with left padding."""
    from fastrlhf.distributed import gathered_params
    from fastrlhf.models.attention import padded_attention

    tok = policy.tokenizer
    model = policy.model  # the PeftModel when LoRA, so the adapter is active
    device = policy.lm_head_weight.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[list[int]] = []
    starts = range(0, len(prompt_ids), batch_size)
    for start in progress(starts, "generating", show_progress):
        chunk = prompt_ids[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # [b, T]
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [b, T]
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        # packed (varlen) attention cannot see a padding mask: generate with SDPA; a
        # sharded policy is gathered once for the whole generation
        with gathered_params(policy), padded_attention(policy.causal_lm):
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tok.eos_token_id,
            )[:, width:].tolist()
        for row in gen:
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            out.append(row)
    return out


def gold_accuracy(
    policy, prompts: list[dict[str, Any]], max_new_tokens: int, scorer, data: DataConfig
) -> float:
    """Mean gold score ``scorer(prompt_text, response_text)`` of greedy responses to
    ``prompts`` (records tokenized as the stage's ``data`` settings say)."""
    from fastrlhf.data.formats import tokenize_prompts

    items = tokenize_prompts(prompts, policy.tokenizer, data_settings(data))
    if not items:
        raise ValueError("gold_accuracy: no usable prompts")
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            responses = greedy_generate(policy, [it.input_ids for it in items], max_new_tokens)
    finally:
        policy.train(was_training)
    texts = policy.tokenizer.batch_decode(responses, skip_special_tokens=True)
    return sum(scorer(it.text, t) for it, t in zip(items, texts)) / len(items)
