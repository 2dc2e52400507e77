"""``feedback sample``: K responses per prompt from a policy checkpoint, as new items.

The policy is loaded with ``fastrlhf.models.load_policy`` and sampled with the project's
own rollout engine (``fastrlhf.rollout.generate``: static KV cache, packed prompts, the
policy's own lm_head), exactly as PPO samples rollouts. Each prompt is repeated K times
in one packed batch; sequence j of prompt i gets the sampling key
``sequence_keys(seed, 0, i * K + j)``, so the samples depend only on (seed, prompt index,
j), not on the batch size.

Prompts are JSONL rows ``{"prompt", "id"?}`` (or ``{"messages"}``, rendered with the
tokenizer's chat template). An item's id is the row's ``id`` (else a hash of the prompt)
with ``-s<seed>`` appended, so sampling the same prompts again with another seed adds new
items. Each item records the model directory and the sampling settings.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from fastrlhf.feedback.store import Item


@dataclass
class SampleSettings:
    k: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 32  # prompts per generate() call (batch_size * k sequences)
    seed: int = 0
    max_prompt_length: int = 512
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(f"-k must be >= 2 (a comparison needs two responses), got {self.k}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 (greedy decoding would give K identical responses), "
                f"got {self.temperature}"
            )


def _item_id(row: dict, text: str, seed: int) -> str:
    base = row.get("id")
    if base is None:
        base = "p" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{base}-s{seed}"


def sample_items(
    model_dir: str | Path, prompts: list[dict], settings: SampleSettings
) -> list[Item]:
    """Sample ``settings.k`` responses for every prompt record; returns the items."""
    import torch

    from fastrlhf.data.formats import DataSettings, tokenize_prompts
    from fastrlhf.models import load_policy
    from fastrlhf.rollout import (
        GenerationConfig,
        ReusableKVCache,
        generate,
        pack_prompts,
        sequence_keys,
    )
    from fastrlhf.trainers.runtime import resolve_device

    device = resolve_device(settings.device)
    policy = load_policy(str(model_dir), device=device)
    policy.eval()
    tok = policy.tokenizer
    if tok is None:
        raise ValueError(f"--model {model_dir} ships no tokenizer")
    data = DataSettings(
        max_length=settings.max_prompt_length + settings.max_new_tokens,
        max_prompt_length=settings.max_prompt_length,
        on_malformed="error",
    )
    tokenized = tokenize_prompts(prompts, tok, data)
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
    )
    kv = ReusableKVCache()
    k = settings.k
    recorded = {key: v for key, v in asdict(settings).items() if key not in ("device",)}
    items: list[Item] = []
    for start in range(0, len(tokenized), settings.batch_size):
        chunk = tokenized[start : start + settings.batch_size]
        seqs = [torch.tensor(p.input_ids) for p in chunk for _ in range(k)]
        ids, cu = pack_prompts(seqs, device)
        global_ids = torch.arange(start * k, (start + len(chunk)) * k, device=device)
        keys = sequence_keys(settings.seed, 0, global_ids)
        with torch.no_grad():
            rollout = generate(policy, ids, cu, config, kv_cache=kv, sample_keys=keys)
        texts = tok.batch_decode(
            [r.tolist() for r in rollout.responses()], skip_special_tokens=True
        )
        for n, p in enumerate(chunk):
            row = prompts[start + n]
            items.append(
                Item(
                    _item_id(row, p.text, settings.seed),
                    p.text,
                    texts[n * k : (n + 1) * k],
                    None,
                    str(model_dir),
                    recorded,
                )
            )
    return items
