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
CUDA: 1M tokens as 512 x 2048 (and 4096 x 256); CPU: 64 x 512.

GB/s counts the bytes the fused op must move: forward reads 5 float32 inputs and the
bool mask (21 B/token); backward reads them again except entropy (17 B/token) and
writes d logp and d entropy (8 B/token), so "full" = 46 B/token. Reported against
harness.copy_bandwidth_gbs. value_loss rows use 13 B/token forward, 17 B/token more
backward (30 B/token full).

    .venv/bin/python -m bench.bench_ppo_loss
"""

from __future__ import annotations

import torch

from bench.harness import peak_memory_bytes, row, run_bandwidth_bench, time_fn
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


def bench_shape(b: int, t: int, device: str, ceiling: float) -> list[dict]:
    logp, old, adv, ref, ent, mask = make_batch(b, t, device)
    n = b * t
    providers = {
        ("ppo_policy_loss", "reference"): (_ppo(ppo_policy_loss_reference), 21, 46),
        ("ppo_policy_loss", "ours"): (_ppo(ppo_policy_loss), 21, 46),
        ("value_loss", "reference"): (_value(value_loss_reference), 13, 30),
        ("value_loss", "ours"): (_value(value_loss), 13, 30),
    }
    if device == "cuda":
        providers[("ppo_policy_loss", "compiled_ref")] = (
            _ppo(torch.compile(ppo_policy_loss_reference)), 21, 46)  # fmt: skip
        providers[("value_loss", "compiled_ref")] = (
            _value(torch.compile(value_loss_reference)), 13, 30)  # fmt: skip
    rows = []
    baseline: dict[tuple[str, str], float] = {}
    for (op, name), (fn, fwd_bytes, full_bytes) in providers.items():
        x = logp.detach().clone().requires_grad_(True)
        e = ent.detach().clone().requires_grad_(True)
        passes = {
            "forward": (lambda fn=fn, x=x: fn(x.detach(), old, adv, ref, ent, mask), fwd_bytes),
            "full": (lambda fn=fn, x=x, e=e: fn(x, old, adv, ref, e, mask).backward(), full_bytes),
        }
        for pass_, (run, per_token) in passes.items():
            t_ = time_fn(run, device, warmup=2, rep=10 if device == "cpu" else 50)
            gbs = n * per_token / (t_.median_ms * 1e-3) / 1e9
            extra = {"tokens": n, "gb_per_s": gbs, "frac_of_copy_bw": gbs / ceiling, "loss": op}
            if name == "reference":
                baseline[(op, pass_)] = t_.median_ms
            elif (op, pass_) in baseline:
                extra["speedup_vs_reference"] = baseline[(op, pass_)] / t_.median_ms
            rows.append(
                row(shape=f"{b}x{t}", dtype="float32", provider=name, pass_=pass_, timing=t_,
                    peak_bytes=peak_memory_bytes(run, device), **extra)
            )  # fmt: skip
    return rows


def _cases(device: str) -> list[tuple]:
    return [(512, 2048), (4096, 256)] if device == "cuda" else [(64, 512)]


def main() -> None:
    run_bandwidth_bench("ppo_loss", _cases, bench_shape)


if __name__ == "__main__":
    main()
