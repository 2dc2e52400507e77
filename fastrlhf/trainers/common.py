"""What the stages share: model and data set-up from a RunConfig, response log-probs
through the fused lm_head op, and greedy generation scored by a gold checker.

Legend: N = packed tokens, n = response (loss) tokens, B = sequences, H = hidden size,
P = preference pairs (B = 2P, sequence 2i chosen, 2i+1 rejected).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastrlhf.config import DataConfig, ModelConfig, RunConfig
from fastrlhf.data.batch import IGNORE_INDEX, PackedBatch

EMBEDDED = "embedded"


# ---------------------------------------------------------------------------------------
# models


def model_path(model: ModelConfig, run_dir: str | Path) -> str:
    """``model.name_or_path``, with "embedded" materialised (once) under the run dir."""
    if model.name_or_path != EMBEDDED:
        return model.name_or_path
    from fastrlhf.checkpoint import atomic_write_dir
    from fastrlhf.data.embedded import embedded_model

    out = Path(run_dir) / "embedded_model"
    if not out.is_dir():  # written atomically: a directory that exists is complete
        atomic_write_dir(out, lambda tmp: embedded_model(tmp, seed=model.embedded_seed))
    return str(out)


def weights_dtype(model: ModelConfig) -> str:
    # "auto": float32 master weights; on CUDA autocast runs the matmuls in bf16
    return "float32" if model.dtype == "auto" else model.dtype


def load_policy_for(cfg: RunConfig, name_or_path: str, device: torch.device, *, trainable: bool):
    """The policy of ``cfg.model`` at ``name_or_path``; a frozen one (no LoRA, no gradient
    checkpointing, eval mode) unless ``trainable``."""
    from fastrlhf.models import load_policy

    m = cfg.model
    policy = load_policy(
        name_or_path,
        dtype=weights_dtype(m),
        device=device,
        trust_remote_code=m.trust_remote_code,
        lora_rank=m.lora_rank if trainable else 0,
        lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
        lora_target_modules=m.lora_target_modules,
        gradient_checkpointing=m.gradient_checkpointing and trainable,
        attn_impl=m.attn_impl,
    )
    if policy.tokenizer is None:
        raise ValueError(f"model.name_or_path={name_or_path!r} ships no tokenizer")
    return policy if trainable else frozen(policy)


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ---------------------------------------------------------------------------------------
# data


def embedded_task(data: DataConfig, seed: int | None = None):
    from fastrlhf.data.embedded import ArithmeticTask

    return ArithmeticTask(
        data.seed if seed is None else seed, max_operand=data.embedded_max_operand
    )


def _embedded_records(data: DataConfig, kind: str) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of the embedded arithmetic task; eval prompts never occur in
    train (the task has few distinct problems, so held-out means filtered)."""

    def draw(task, n: int) -> list[dict]:
        if kind == "sft":
            return task.sft_records(n)
        if kind == "pairs":
            return task.preference_records(n)
        return task.rl_prompts(n)

    train = draw(embedded_task(data), data.num_train)
    seen = {r["prompt"] for r in train}
    pool = draw(embedded_task(data, data.seed + 1), 4 * data.num_eval + 64)
    held_out = [r for r in pool if r["prompt"] not in seen][: data.num_eval]
    return train, held_out


def stage_records(data: DataConfig, kind: str) -> tuple[list[dict], list[dict]]:
    """(train, eval) records for kind "sft" | "pairs" | "prompts"."""
    if data.source == EMBEDDED:
        return _embedded_records(data, kind)
    import os

    from fastrlhf.data.loading import train_eval_records

    train, held_out, how = train_eval_records(
        data.source,
        data.train_split,
        data.eval_split,
        data.num_eval,
        seed=data.seed,
        on_malformed=data.on_malformed,
    )
    if os.environ.get("RANK", "0") == "0":
        print(f"[data] {how}")
    return train, held_out


def data_settings(data: DataConfig, run_dir: str | None = None):
    """``run_dir``: skipped rows go to <run_dir>/malformed.jsonl."""
    from fastrlhf.data.formats import DataSettings

    return DataSettings(
        max_length=data.max_length,
        max_prompt_length=data.max_prompt_length,
        on_malformed=data.on_malformed,
        malformed_file=str(Path(run_dir) / "malformed.jsonl") if run_dir else None,
    )


# ---------------------------------------------------------------------------------------
# log-probs of response tokens


@dataclass
class LossIndex:
    """Where the loss tokens of a packed batch are: [n] token positions and their sequence."""

    positions: torch.Tensor  # [n] int64 indices into the N packed tokens
    seq_ids: torch.Tensor  # [n] int64 sequence of each loss token


def loss_index(batch: PackedBatch) -> LossIndex:
    """Computed on the CPU copy of the batch, so selecting rows later needs no host sync."""
    positions = (batch.labels != IGNORE_INDEX).nonzero().squeeze(1)  # [n]
    seq_of_token = torch.repeat_interleave(
        torch.arange(batch.num_seqs), batch.seq_lens.long()
    )  # [N]
    return LossIndex(positions, seq_of_token[positions])


def response_logprobs(policy, batch: PackedBatch, index: LossIndex) -> torch.Tensor:
    """float32 log p(label) at the n loss tokens [n], via the fused lm_head op: the [N, V]
    logits never exist, and prompt positions never reach the lm_head."""
    from fastrlhf.ops import linear_token_logprobs

    hidden = policy(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    h = hidden.index_select(0, index.positions)  # [n, H]
    labels = batch.labels.index_select(0, index.positions)  # [n]
    weight = policy.lm_head_weight
    bias = policy.lm_head_bias
    if weight.dtype != h.dtype:  # autocast gave bf16 hidden states; fp32 master weights
        weight = weight.to(h.dtype)
        bias = bias.to(h.dtype) if bias is not None else None
    # validate=False: no device sync for a label range check; a bad label gives NaN, which
    # the loop's non-finite check turns into an error naming the step
    return linear_token_logprobs(
        h, weight, labels, bias=bias, vocab_size=policy.vocab_size, validate=False
    )


def sequence_sums(values: torch.Tensor, index: LossIndex, num_seqs: int) -> torch.Tensor:
    """[B] per-sequence sums of per-loss-token ``values`` [n]."""
    out = torch.zeros(num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add(0, index.seq_ids, values)


def move_index(index: LossIndex, device: torch.device) -> LossIndex:
    return LossIndex(index.positions.to(device), index.seq_ids.to(device))


# ---------------------------------------------------------------------------------------
# generation with a gold checker (evaluation only)


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
    from fastrlhf.trainers.loop import progress

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
