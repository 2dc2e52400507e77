"""Benchmark of linear_token_logprobs (fused lm_head + log-prob) against the unfused path.

    .venv/bin/python -m bench.bench_linear_logprobs

Providers:
  unfused-torch       hidden @ W.T in the model dtype -> float32 log_softmax -> gather
                      (fastrlhf.ops.reference.linear_token_logprobs_reference)
  unfused-compiled    torch.compile of the same (CUDA only: compiling on CPU costs minutes)
  ours-triton         impl="triton" (CUDA only: on CPU it would time the interpreter)
  ours-chunked-torch  impl="torch", vocabulary blocks with torch.mm
  liger-flce          Liger's fused linear cross entropy (sum reduction), when importable
Passes: "fwd" (no autograd, as for reference-policy log-probs) and "full" (forward and
backward for hidden and weight). TFLOP/s counts 2*N*H*V for fwd and 8*N*H*V for full
(forward, recompute, dH, dW), reported against harness.matmul_tflops.

On CUDA the issue's reference case runs (bf16, N = 8192, H = 4096, V = 151,936) with
peak memory from the caching allocator. On CPU: small fp32 timings, then peak resident
memory of a fresh process at N = 4096, H = 256, V = 151,936 (the unfused provider there
runs the forward only: its forward alone materializes three [N, V] float32 tensors,
7.5 GB; a backward would double that on a shared machine).
"""

from __future__ import annotations

import sys

import torch

from bench import harness
from fastrlhf.ops import linear_token_logprobs
from fastrlhf.ops.reference import linear_token_logprobs_reference

OP = "linear_logprobs"


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda h, w, y: -loss(w, h, y)  # sum of log-probs, like the other providers


def providers(device: torch.device) -> dict:
    out = {"unfused-torch": lambda h, w, y: linear_token_logprobs_reference(h, w, y).sum()}
    if device.type == "cuda":
        out["unfused-compiled"] = torch.compile(out["unfused-torch"])
        out["ours-triton"] = lambda h, w, y: linear_token_logprobs(
            h, w, y, validate=False, impl="triton"
        ).sum()
    out["ours-chunked-torch"] = lambda h, w, y: linear_token_logprobs(
        h, w, y, validate=False, impl="torch"
    ).sum()
    liger = _liger()
    if liger is not None and device.type == "cuda":
        out["liger-flce"] = liger
    return out


def _inputs(n, h, v, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=gen) * h**-0.5).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    return hidden, weight.requires_grad_(), labels


def bench_case(n, h, v, dtype, device, peak_flops) -> list[dict]:
    hidden, weight, labels = _inputs(n, h, v, dtype, device)
    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    shape = f"N={n} H={h} V={v}"
    rows = []
    for name, fn in providers(device).items():

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(hidden, weight, labels)

        def full(fn=fn):
            return torch.autograd.grad(fn(hidden, weight, labels), (hidden, weight))

        for pass_, run, flops in [("fwd", fwd, 2 * n * h * v), ("full", full, 8 * n * h * v)]:
            try:
                timing = harness.time_fn(run, device, warmup=1, rep=5)
                peak = harness.peak_memory_bytes(run, device)
            except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. unfused OOM
                print(f"{name} {pass_}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                continue
            tflops = flops / (timing.median_ms * 1e-3) / 1e12
            extra = {"tflops": tflops, "fraction_of_matmul_peak": tflops / peak_flops}
            if peak is not None and pass_ == "full":
                extra["peak_minus_grads_bytes"] = peak - grad_bytes
            rows.append(
                harness.row(
                    shape=shape,
                    dtype=str(dtype).replace("torch.", ""),
                    provider=name,
                    pass_=pass_,
                    timing=timing,
                    peak_bytes=peak,
                    **extra,
                )
            )
    return rows


_RSS_CODE = """
import torch
from fastrlhf.ops import linear_token_logprobs
from fastrlhf.ops.reference import linear_token_logprobs_reference
torch.manual_seed(0)
n, h, v = {n}, {h}, {v}
hidden = torch.randn(n, h).requires_grad_()
weight = (torch.randn(v, h) * h ** -0.5).requires_grad_()
labels = torch.randint(0, v, (n,))
if {ours}:
    lp = linear_token_logprobs(hidden, weight, labels, validate=False, impl="torch")
    torch.autograd.grad(lp.sum(), (hidden, weight))
else:
    with torch.no_grad():
        linear_token_logprobs_reference(hidden, weight, labels)
"""


def cpu_rss_rows(n=4096, h=256, v=151936) -> list[dict]:
    """Peak RSS of a fresh process: ours (fwd + bwd) vs materialized logits (fwd only)."""
    base = harness.peak_rss_of("import torch, fastrlhf.ops")
    inputs = (n * h + v * h) * 4
    rows = []
    for name, ours, pass_ in [
        ("ours-chunked-torch", True, "full"),
        ("unfused-torch", False, "fwd"),
    ]:
        peak = harness.peak_rss_of(_RSS_CODE.format(n=n, h=h, v=v, ours=ours))
        rows.append(
            harness.row(
                shape=f"N={n} H={h} V={v}",
                dtype="float32",
                provider=name,
                pass_=pass_,
                timing=None,
                peak_bytes=None,
                peak_rss_bytes=peak,
                rss_above_inputs_bytes=peak - base - inputs,
                logits_bytes=n * v * 4,
            )
        )
    return rows


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak_flops = harness.matmul_tflops(device)
    print(f"matmul ceiling on {device}: {peak_flops:.1f} TFLOP/s")
    if device.type == "cuda":
        cases = [(8192, 4096, 151936, torch.bfloat16), (4096, 2048, 32000, torch.bfloat16)]
    else:
        cases = [(512, 256, 32000, torch.float32)]
    # RSS first, while this process is small: a child's ru_maxrss starts from the
    # parent's resident size at fork (Linux keeps the high-water mark across exec).
    rows = cpu_rss_rows() if device.type == "cpu" else []
    for n, h, v, dtype in cases:
        rows += bench_case(n, h, v, dtype, device, peak_flops)
    harness.print_rows(rows)
    path = harness.append_rows(OP, rows, device)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
