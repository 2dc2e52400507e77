"""Benchmark of token_logprobs: per-token log p(label) from [N, V] logits.

Providers (each gives -log p or log p of the labels; "full" = forward + backward of
the sum):
  reference      float32 log_softmax + gather (fastrlhf.ops.reference.token_logprobs_reference)
  compiled_ref   torch.compile of the reference (CUDA only: on CPU its compile time
                 dwarfs the run)
  ours           fastrlhf.ops.token_logprobs (Triton on CUDA; the chunked PyTorch path
                 on CPU)
  ours_inplace   ours with inplace_backward=True (dlogits written over the logits)
  flash_attn     flash_attn.ops.triton.cross_entropy.cross_entropy_loss, when importable
  liger          liger_kernel's cross entropy (reduction="none"), when importable

Shapes: CUDA bf16 [8192, 151936] (the issue's reference shape) and [8192, 32000]; CPU
float32 [256, 32000] and [64, 151936]; ``--tiny`` one small CPU shape (the GPU script's
dry run). Every row: device time (CUDA events), host issue time, profiled kernel time,
and the cost formula: forward reads the logits once (N V elem bytes, ~5 N V FLOPs);
forward + backward reads them twice and writes dlogits once (3 N V elem bytes, ~11 N V
FLOPs), against the measured copy bandwidth. "full" rows take gradients with
torch.autograd.grad (no AccumulateGrad into a persistent .grad in the timed region);
ours_inplace overwrites its own input buffer, which is reused from call to call. Rows
are appended as they are measured. ``--compiled`` adds torch.compile of the reference.

    .venv/bin/python -m bench.bench_token_logprobs [--tiny] [--compiled]
"""

from __future__ import annotations

import argparse

import torch

from bench import harness
from fastrlhf.ops import token_logprobs
from fastrlhf.ops.reference import token_logprobs_reference


def _peers():
    """name -> fn(logits, labels) returning per-token values, for installed peers."""
    peers = {}
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

        peers["flash_attn"] = lambda x, y: cross_entropy_loss(x, y)[0]
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        pass
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        peers["liger"] = lambda x, y: liger_cross_entropy(x, y, reduction="none")
    except Exception:  # noqa: BLE001
        pass
    return peers


def providers(device: str, compiled: bool) -> dict:
    # ours first: a run stopped by its time cap keeps the headline rows
    out = {
        "ours": lambda x, y: token_logprobs(x, y, validate=False),
        "ours_inplace": lambda x, y: token_logprobs(x, y, validate=False, inplace_backward=True),
        "reference": lambda x, y: token_logprobs_reference(x, y),
    }
    if device == "cuda" and compiled:
        out["compiled_ref"] = torch.compile(token_logprobs_reference)
    if device == "cuda":
        out.update(_peers())
    return out


def bench_shape(n, v, dtype, device, ceil, compiled) -> list[dict]:
    logits = torch.randn(n, v, device=device, dtype=dtype)  # [N, V]
    labels = torch.randint(0, v, (n,), device=device)  # [N]
    elem = logits.element_size()
    shape, dt = f"{n}x{v}", str(dtype).replace("torch.", "")
    rows = []
    for name, fn in providers(device, compiled).items():
        for pass_ in ["full"] if name == "ours_inplace" else ["forward", "full"]:
            if pass_ == "forward":
                run = lambda fn=fn: fn(logits, labels)
                nbytes, flops = n * v * elem, 5 * n * v
            else:
                # a leaf whose gradient is returned, never accumulated; the in-place
                # provider writes its gradient over this same buffer on every call
                leaf = logits.detach().clone().requires_grad_(True)
                run = lambda fn=fn, leaf=leaf: torch.autograd.grad(fn(leaf, labels).sum(), leaf)
                nbytes, flops = 3 * n * v * elem, 11 * n * v
            try:
                m = harness.measure(run, device, warmup=2, rep=5 if device == "cpu" else 20)
            except Exception as e:  # noqa: BLE001 - a peer failing must not stop the run
                print(f"{name} {pass_}: failed ({type(e).__name__}: {e})")
                continue
            r = harness.row(shape=shape, dtype=dt, provider=name, pass_=pass_, timing=None,
                            peak_bytes=harness.peak_memory_bytes(run, device), **m,
                            **harness.cost_fields(nbytes, flops, m["median_ms"], ceil))  # fmt: skip
            harness.append_rows("token_logprobs", [r], device)
            harness.print_rows([r])
            rows.append(r)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="token_logprobs benchmark")
    ap.add_argument("--tiny", action="store_true", help="one small shape (dry run)")
    ap.add_argument("--compiled", action="store_true", help="add torch.compile providers")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ceil = harness.Ceilings.of(device)
    print(f"device {device}: copy {ceil.copy_gbs:.1f} GB/s, peak {ceil.peak_name}")
    if a.tiny:
        shapes = [(16, 4096, torch.float32)]
    elif device == "cuda":
        shapes = [(8192, 151936, torch.bfloat16), (8192, 32000, torch.bfloat16)]
    else:
        shapes = [(256, 32000, torch.float32), (64, 151936, torch.float32)]
    for n, v, dtype in shapes:
        bench_shape(n, v, dtype, device, ceil, a.compiled)
    print("appended to", harness.results_dir() / "token_logprobs.jsonl")


if __name__ == "__main__":
    main()
