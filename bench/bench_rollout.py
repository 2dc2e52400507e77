"""Rollout generation throughput: ``fastrlhf.rollout.generate`` vs HF ``model.generate``.

Providers (same random-init Llama, same prompts, sampling at T = 1, no EOS so every
provider decodes exactly R tokens per row):

    ours           generate() with a ReusableKVCache kept across calls (reset, no realloc)
    ours_fresh     generate() with a new cache per call (allocation every rollout)
    hf_generate    transformers' model.generate (its default dynamic cache), for reference;
                   it also records no log-probs, which ours does

Reported: median / p20 / p80 ms per rollout, generated tokens per second, peak memory
(CUDA) and the KV cache size. Decode is latency-bound at these sizes, so the ceiling that
matters is the per-step weight read: ``weight_bytes / copy_bandwidth`` per step, reported
as ``floor_ms`` (the time R steps would take if each only read the weights once at the
measured copy bandwidth).

Run: ``.venv/bin/python -m bench.bench_rollout`` (CPU: a small model in < 1 minute;
CUDA: a TinyLlama-1.1B-shaped model in bf16, B = 64, P = 128, R = 128).
"""

from __future__ import annotations

import torch

from bench.harness import (
    append_rows,
    copy_bandwidth_gbs,
    peak_memory_bytes,
    print_rows,
    row,
    time_fn,
)
from fastrlhf.rollout import GenerationConfig, ReusableKVCache, generate, pack_prompts


def _model(device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if device.type == "cuda":
        cfg = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                   num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)  # fmt: skip
        dtype, batch, prompt, new = torch.bfloat16, 64, 128, 128
    else:
        cfg = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, vocab_size=2000)  # fmt: skip
        dtype, batch, prompt, new = torch.float32, 8, 32, 16
    config = LlamaConfig(**cfg, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    return model, dtype, batch, prompt, new


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, dtype, batch, prompt, new = _model(device)
    vocab = model.config.vocab_size
    g = torch.Generator(device=device).manual_seed(0)
    # prompt lengths from P/2 to P: left padding is exercised
    lens = torch.randint(prompt // 2, prompt + 1, (batch,)).tolist()
    prompts = [torch.randint(1, vocab, (n,), device=device) for n in lens]
    ids, cu = pack_prompts(prompts)
    cfg = GenerationConfig(max_new_tokens=new, temperature=1.0, eos_token_id=None)
    kv = ReusableKVCache()

    def ours():
        return generate(model, ids, cu, cfg, kv_cache=kv, generator=g)

    def ours_fresh():
        return generate(model, ids, cu, cfg, kv_cache=ReusableKVCache(), generator=g)

    # HF generate on the same left-padded prompts
    width = max(lens)
    padded = torch.zeros(batch, width, dtype=torch.long, device=device)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        padded[b, width - p.numel() :] = p
        mask[b, width - p.numel() :] = 1

    def hf():
        with torch.no_grad():
            return model.generate(
                input_ids=padded, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                eos_token_id=None,
            )  # fmt: skip

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth_gbs(device)
    floor_ms = new * weight_bytes / (bw * 1e9) * 1e3  # bw counts bytes moved (read + write)
    shape = f"B={batch} P<={prompt} R={new} L={model.config.num_hidden_layers} V={vocab}"
    rows = []
    ours()  # allocates the cache once
    kv_bytes = kv.nbytes()
    for name, fn in (("ours", ours), ("ours_fresh", ours_fresh), ("hf_generate", hf)):
        timing = time_fn(fn, device, warmup=1, rep=3)
        rows.append(
            row(
                shape=shape,
                dtype=str(dtype).replace("torch.", ""),
                provider=name,
                pass_="generate",
                timing=timing,
                peak_bytes=peak_memory_bytes(fn, device),
                tokens_per_s=batch * new / (timing.median_ms * 1e-3),
                floor_ms=floor_ms,
                kv_cache_bytes=kv_bytes if name.startswith("ours") else None,
                weight_bytes=weight_bytes,
                copy_gbs=bw,
            )
        )
    print_rows(rows)
    print("->", append_rows("rollout", rows, device))


if __name__ == "__main__":
    main()
