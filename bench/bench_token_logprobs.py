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

Shapes: CUDA bf16 [8192, 151936] (the issue's reference shape); CPU float32
[256, 32000] and [64, 151936]. GB/s counts the bytes the op must move at least: one
read of the logits forward; two reads and one write of [N, V] for forward + backward;
it is reported against harness.copy_bandwidth_gbs (the same device's D2D copy rate).
Peak memory (CUDA) is what the call allocates above the inputs.

    .venv/bin/python -m bench.bench_token_logprobs
"""

from __future__ import annotations

import torch

from bench.harness import peak_memory_bytes, row, run_bandwidth_bench, time_fn
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


def providers(device: str) -> dict:
    out = {
        "reference": lambda x, y: token_logprobs_reference(x, y),
        "ours": lambda x, y: token_logprobs(x, y, validate=False),
        "ours_inplace": lambda x, y: token_logprobs(x, y, validate=False, inplace_backward=True),
    }
    if device == "cuda":
        out["compiled_ref"] = torch.compile(token_logprobs_reference)
    out.update(_peers())
    return out


def bench_shape(n: int, v: int, dtype: torch.dtype, device: str, ceiling: float) -> list[dict]:
    logits = torch.randn(n, v, device=device, dtype=dtype)  # [N, V]
    labels = torch.randint(0, v, (n,), device=device)  # [N]
    elem = logits.element_size()
    shape, dt = f"{n}x{v}", str(dtype).replace("torch.", "")
    rows = []
    ref_fwd = None
    for name, fn in providers(device).items():
        for pass_ in ["full"] if name == "ours_inplace" else ["forward", "full"]:
            if pass_ == "forward":
                run = lambda fn=fn: fn(logits, labels)
                moved = n * v * elem
            else:
                leaf = logits.detach().clone().requires_grad_(True)
                moved = 3 * n * v * elem
                if name == "ours_inplace":
                    # it overwrites its input: give it a fresh non-leaf each call (the
                    # copy `leaf * 1` is timed too, so this row is pessimistic)
                    run = lambda fn=fn, leaf=leaf: fn(leaf * 1, labels).sum().backward()
                else:
                    run = lambda fn=fn, leaf=leaf: fn(leaf, labels).sum().backward()
            try:
                t = time_fn(run, device, warmup=2, rep=5 if device == "cpu" else 20)
            except Exception as e:  # noqa: BLE001 - a peer failing must not stop the run
                print(f"{name} {pass_}: failed ({type(e).__name__}: {e})")
                continue
            gbs = moved / (t.median_ms * 1e-3) / 1e9
            extra = {"gb_per_s": gbs, "frac_of_copy_bw": gbs / ceiling}
            if name == "reference" and pass_ == "forward":
                ref_fwd = t.median_ms
            if pass_ == "forward" and ref_fwd is not None:
                extra["speedup_vs_reference"] = ref_fwd / t.median_ms
            rows.append(
                row(shape=shape, dtype=dt, provider=name, pass_=pass_, timing=t,
                    peak_bytes=peak_memory_bytes(run, device), **extra)
            )  # fmt: skip
    return rows


def _cases(device: str) -> list[tuple]:
    if device == "cuda":
        return [(8192, 151936, torch.bfloat16), (8192, 32000, torch.bfloat16)]
    return [(256, 32000, torch.float32), (64, 151936, torch.float32)]


def main() -> None:
    run_bandwidth_bench("token_logprobs", _cases, bench_shape)


if __name__ == "__main__":
    main()
