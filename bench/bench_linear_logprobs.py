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
backward for hidden and weight through torch.autograd.grad: no AccumulateGrad in the
timed region). Cost formula: 2*N*H*V FLOPs fwd and 8*N*H*V full (forward, recompute,
dH, dW); bytes (N*H + V*H) elem fwd, 3x that full (read twice, write both gradients).
Each row: device / host / kernel time (harness.measure), the fraction of the datasheet
dense bf16 peak and of the measured matmul rate; appended as soon as measured.
``--tiny``: one small CPU shape (the GPU script's dry run); ``--compiled`` adds
torch.compile of the unfused path.

On CUDA the issue's reference case runs (bf16, N = 8192, H = 4096, V = 151,936) with
peak memory from the caching allocator. On CPU: small fp32 timings, then peak resident
memory of a fresh process at N = 4096, H = 256, V = 151,936 (the unfused provider there
runs the forward only: its forward alone materializes three [N, V] float32 tensors,
7.5 GB; a backward would double that on a shared machine).
"""

from __future__ import annotations

import argparse
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


def providers(device: torch.device, compiled: bool = False) -> dict:
    """Ours first: a run stopped by its time cap keeps the headline rows."""
    out = {}
    if device.type == "cuda":
        out["ours-triton"] = lambda h, w, y: linear_token_logprobs(
            h, w, y, validate=False, impl="triton"
        ).sum()
    out["ours-chunked-torch"] = lambda h, w, y: linear_token_logprobs(
        h, w, y, validate=False, impl="torch"
    ).sum()
    out["unfused-torch"] = lambda h, w, y: linear_token_logprobs_reference(h, w, y).sum()
    if device.type == "cuda" and compiled:
        out["unfused-compiled"] = torch.compile(out["unfused-torch"])
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


def bench_case(n, h, v, dtype, device, ceil, matmul_peak, compiled=False) -> list[dict]:
    hidden, weight, labels = _inputs(n, h, v, dtype, device)
    elem = hidden.element_size()
    grad_bytes = (hidden.numel() + weight.numel()) * elem
    shape = f"N={n} H={h} V={v}"
    rows = []
    for name, fn in providers(device, compiled).items():

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(hidden, weight, labels)

        def full(fn=fn):
            return torch.autograd.grad(fn(hidden, weight, labels), (hidden, weight))

        io = (n * h + v * h) * elem
        for pass_, run, flops, nbytes in [
            ("fwd", fwd, 2 * n * h * v, io),
            ("full", full, 8 * n * h * v, 3 * io),
        ]:
            try:
                m = harness.measure(run, device, warmup=1, rep=5)
                peak = harness.peak_memory_bytes(run, device)
            except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. unfused OOM
                print(f"{name} {pass_}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                continue
            extra = harness.cost_fields(nbytes, flops, m["median_ms"], ceil)
            extra["frac_of_measured_matmul"] = extra["tflops"] / matmul_peak
            if peak is not None and pass_ == "full":
                extra["peak_minus_grads_bytes"] = peak - grad_bytes
            r = harness.row(shape=shape, dtype=str(dtype).replace("torch.", ""), provider=name,
                            pass_=pass_, timing=None, peak_bytes=peak, **m, **extra)  # fmt: skip
            harness.append_rows(OP, [r], device)
            harness.print_rows([r])
            rows.append(r)
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="linear_token_logprobs benchmark")
    ap.add_argument("--tiny", action="store_true", help="one small shape (dry run)")
    ap.add_argument("--compiled", action="store_true", help="add torch.compile providers")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ceil = harness.Ceilings.of(device)
    matmul_peak = harness.matmul_tflops(device)
    print(f"{device}: measured matmul {matmul_peak:.1f} TFLOP/s, peak {ceil.peak_name}")
    if a.tiny:
        cases = [(64, 32, 1000, torch.float32)]
    elif device.type == "cuda":
        cases = [(8192, 4096, 151936, torch.bfloat16), (4096, 2048, 32000, torch.bfloat16)]
    else:
        cases = [(512, 256, 32000, torch.float32)]
    if device.type == "cpu" and not a.tiny:
        # RSS first, while this process is small: a child's ru_maxrss starts from the
        # parent's resident size at fork (Linux keeps the high-water mark across exec).
        rss = cpu_rss_rows()
        harness.append_rows(OP, rss, device)
        harness.print_rows(rss)
    for n, h, v, dtype in cases:
        bench_case(n, h, v, dtype, device, ceil, matmul_peak, a.compiled)
    print("appended to", harness.results_dir() / f"{OP}.jsonl")


if __name__ == "__main__":
    main()
