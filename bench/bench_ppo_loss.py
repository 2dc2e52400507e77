"""Benchmark of ppo_policy_loss (and value_loss): the fused kernels against the op chain.

Providers:
  reference     fastrlhf.ops.reference.ppo_policy_loss_reference: the elementwise PyTorch
                chain a trainer runs (~25 ops, one launch and one [N] pass each)
  compiled_ref  torch.compile of the reference (CUDA only: on CPU the compile time
                dwarfs the run)
  ours          fastrlhf.ops.ppo_policy_loss: one Triton launch forward, one backward
                (on CPU without the interpreter: the vectorised PyTorch path)

Inputs: [B, T] float32 logp, old_logp, advantages, ref_logp, entropy and a bool mask,
with dual-clip, the k3 KL term and the entropy bonus all on; agg=seq-mean-token-mean.
CUDA: 1M tokens as 512 x 2048 (and 4096 x 256); CPU: 64 x 512; ``--tiny``: 4 x 64.
"full" rows take gradients with torch.autograd.grad (nothing accumulates into a .grad
in the timed region). Every row carries device, host and kernel time (harness.measure)
and is appended as soon as it is measured. ``--compiled`` adds torch.compile providers.

GB/s counts the bytes the fused op must move: forward reads 5 float32 inputs and the
bool mask (21 B/token); backward reads them again except entropy (17 B/token) and
writes d logp and d entropy (8 B/token), so "full" = 46 B/token. Reported against
the measured copy bandwidth. value_loss rows use 13 B/token forward, 17 B/token more
backward (30 B/token full). FLOPs: ~40 per token forward, ~80 full (ppo); half for value.

    .venv/bin/python -m bench.bench_ppo_loss
"""

from __future__ import annotations

import argparse

import torch

from bench import harness
from fastrlhf.ops import ppo_policy_loss, value_loss
from fastrlhf.ops.reference import ppo_policy_loss_reference, value_loss_reference

KW = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_kind="k3",
          entropy_coef=0.01, agg="seq-mean-token-mean")  # fmt: skip


def make_batch(b: int, t: int, device: str):
    logp = -torch.rand(b, t, device=device) * 3  # [B, T]
    old = logp + torch.randn(b, t, device=device) * 0.2
    adv = torch.randn(b, t, device=device)
    ref = logp + torch.randn(b, t, device=device) * 0.3
    ent = torch.rand(b, t, device=device) * 2
    mask = torch.rand(b, t, device=device) > 0.1
    return logp, old, adv, ref, ent, mask


def _ppo(fn):
    def call(x, old, adv, ref, e, mask):
        return fn(x, old, adv, mask, ref_logp=ref, entropy=e, **KW)[0]

    return call


def _value(fn):
    def call(x, old, adv, ref, e, mask):
        return fn(x, old, adv, mask, 0.2, "token-mean")[0]

    return call


def bench_shape(b: int, t: int, device: str, ceil: harness.Ceilings, compiled: bool) -> None:
    logp, old, adv, ref, ent, mask = make_batch(b, t, device)
    n = b * t
    # (fn, forward bytes/token, full bytes/token, forward FLOPs/token)
    providers = {
        ("ppo_policy_loss", "reference"): (_ppo(ppo_policy_loss_reference), 21, 46, 40),
        ("ppo_policy_loss", "ours"): (_ppo(ppo_policy_loss), 21, 46, 40),
        ("value_loss", "reference"): (_value(value_loss_reference), 13, 30, 20),
        ("value_loss", "ours"): (_value(value_loss), 13, 30, 20),
    }
    if device == "cuda" and compiled:
        providers[("ppo_policy_loss", "compiled_ref")] = (
            _ppo(torch.compile(ppo_policy_loss_reference)), 21, 46, 40)  # fmt: skip
        providers[("value_loss", "compiled_ref")] = (
            _value(torch.compile(value_loss_reference)), 13, 30, 20)  # fmt: skip
    baseline: dict[tuple[str, str], float] = {}
    for (op, name), (fn, fwd_bytes, full_bytes, fwd_flops) in providers.items():
        x = logp.detach().clone().requires_grad_(True)
        e = ent.detach().clone().requires_grad_(True)

        def full(fn=fn, x=x, e=e, op=op):
            wrt = (x, e) if op == "ppo_policy_loss" else (x,)
            return torch.autograd.grad(fn(x, old, adv, ref, e, mask), wrt)

        passes = {
            "forward": (lambda fn=fn: fn(logp, old, adv, ref, ent, mask), fwd_bytes, fwd_flops),
            "full": (full, full_bytes, 2 * fwd_flops),
        }
        for pass_, (run, per_token, flops) in passes.items():
            m = harness.measure(run, device, warmup=2, rep=10 if device == "cpu" else 50)
            extra = {"tokens": n, "loss": op}
            if name == "reference":
                baseline[(op, pass_)] = m["median_ms"]
            elif (op, pass_) in baseline:
                extra["speedup_vs_reference"] = baseline[(op, pass_)] / m["median_ms"]
            r = harness.row(shape=f"{b}x{t}", dtype="float32", provider=name, pass_=pass_,
                            timing=None, peak_bytes=harness.peak_memory_bytes(run, device),
                            **m, **extra,
                            **harness.cost_fields(n * per_token, n * flops, m["median_ms"],
                                                  ceil))  # fmt: skip
            harness.append_rows("ppo_loss", [r], device)
            harness.print_rows([r])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="ppo_policy_loss / value_loss benchmark")
    ap.add_argument("--tiny", action="store_true", help="one small shape (dry run)")
    ap.add_argument("--compiled", action="store_true", help="add torch.compile providers")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ceil = harness.Ceilings.of(device)
    print(f"device {device}: copy {ceil.copy_gbs:.1f} GB/s, peak {ceil.peak_name}")
    if a.tiny:
        shapes = [(4, 64)]
    else:
        shapes = [(512, 2048), (4096, 256)] if device == "cuda" else [(64, 512)]
    for b, t in shapes:
        bench_shape(b, t, device, ceil, a.compiled)
    print("appended to", harness.results_dir() / "ppo_loss.jsonl")


if __name__ == "__main__":
    main()
