"""Packed attention forward + backward, one layer's attention at the 0.5B shape (Qwen2.5-0.5B:
14 query heads, 2 key/value heads, head dim 64), bf16, 64 sequences of mixed lengths
(total 32,768 tokens). GPU only (the varlen kernels are CUDA-only).

Providers (fastrlhf.models.attention paths, same q/k/v, causal):
  torch_varlen          torch.nn.attention.varlen.varlen_attn (split-KV chosen by the kernel)
  torch_varlen_splits1  the same with num_splits=1 (model.attention_batch_invariant=true):
                        the throughput cost of batch-invariant results
  flash_attn            flash_attn_varlen_func, when the flash-attn package is installed
  sdpa_per_sequence     one SDPA call per sequence (the fallback before torch_varlen)
  sdpa_padded           SDPA over the [64, L_max] padded batch with is_causal (the padded
                        tokens are computed and discarded)

Rows go to bench/results/attention.jsonl; tokens/s counts real tokens.

    .venv/bin/python -m bench.bench_attention
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import append_rows, print_rows, row, time_fn
from fastrlhf.models import attention as A

HQ, HKV, D = 14, 2, 64
NUM_SEQS, TOTAL = 64, 32_768


def mixed_lengths(seed: int = 0) -> list[int]:
    """64 lengths summing to 32,768, spread from ~64 to ~1,500 tokens."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(NUM_SEQS, generator=g) ** 2 + 0.05
    lengths = (w / w.sum() * TOTAL).floor().long()
    lengths[0] += TOTAL - int(lengths.sum())
    return lengths.tolist()


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA device (the varlen kernels are CUDA-only)")
    device, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    lengths = mixed_lengths()
    cu = torch.zeros(NUM_SEQS + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.tensor(lengths, device=device).cumsum(0)
    max_len = max(lengths)
    mask = A.VarlenMask(cu, max_len, num_tokens=TOTAL)

    def leaf(h: int) -> torch.Tensor:  # [1, H, N, D] as HF hands it over: a transposed view
        t = torch.randn(1, TOTAL, h, D, device=device, dtype=dtype).transpose(1, 2)
        return t.detach().requires_grad_()

    q, k, v = leaf(HQ), leaf(HKV), leaf(HKV)
    grad = torch.randn(1, TOTAL, HQ, D, device=device, dtype=dtype)

    def step(fn):
        def run():
            q.grad = k.grad = v.grad = None
            fn().backward(grad)

        return run

    providers = {
        "torch_varlen": lambda: A.torch_varlen(q, k, v, mask, 0.0, None, None),
        "torch_varlen_splits1": lambda: A.torch_varlen(
            q, k, v, mask, 0.0, None, None, num_splits=1
        ),
        "sdpa_per_sequence": lambda: A.sdpa_per_sequence(q, k, v, mask, 0.0, None),
    }
    if A.flash_attn_available():
        providers["flash_attn"] = lambda: A._flash_varlen(q, k, v, mask, 0.0, None, None)

    # padded: the same tokens in a [B, L_max] batch
    pq, pk, pv = (
        torch.randn(NUM_SEQS, h, max_len, D, device=device, dtype=dtype, requires_grad=True)
        for h in (HQ, HKV, HKV)
    )
    pgrad = torch.randn(NUM_SEQS, HQ, max_len, D, device=device, dtype=dtype)

    def padded():
        pq.grad = pk.grad = pv.grad = None
        out = F.scaled_dot_product_attention(pq, pk, pv, is_causal=True, enable_gqa=True)
        out.backward(pgrad)

    rows = []
    shape = f"{NUM_SEQS} seqs, {TOTAL} tokens, Hq={HQ} Hkv={HKV} D={D}"
    for name, fn in providers.items():
        t = time_fn(step(fn), device)
        rows.append(
            row(shape=shape, dtype="bfloat16", provider=name, pass_="forward+backward",
                timing=t, tokens_per_s=TOTAL / (t.median_ms * 1e-3), max_len=max_len)
        )  # fmt: skip
    t = time_fn(padded, device)
    rows.append(
        row(shape=shape, dtype="bfloat16", provider="sdpa_padded", pass_="forward+backward",
            timing=t, tokens_per_s=TOTAL / (t.median_ms * 1e-3), max_len=max_len,
            padded_tokens=NUM_SEQS * max_len)
    )  # fmt: skip
    print_rows(rows)
    print("appended to", append_rows("attention", rows, device))


if __name__ == "__main__":
    main()
