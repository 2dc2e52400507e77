"""Benchmark of packed GAE (fastrlhf::packed_gae) against the loops trainers run.

Providers, at 1M tokens as 256 x 4096 and as 8 x 131072 (float32 rewards/values,
10% of tokens masked, bootstrap values):
  ours          fastrlhf.ops.packed_gae (C++ kernel on CPU, CUDA kernel on GPU)
  padded_loop   the reverse loop over T steps on padded [B, T] tensors in torch
                (fastrlhf.ops.reference.padded_gae_reference), on the same device
  python_loop   the float64 Python loop over tokens (packed_gae_reference), CPU only
  alloc_write_floor  allocating and zero-filling the two [N] float32 outputs: the
                floor under any op that returns fresh tensors
Slow providers are timed on a slice and scaled linearly (the row says so in
``scaled_from``): the padded loop's cost is per time step, so it is timed on the
first steps of the padded batch; the Python loop's is per token, so it is timed on
a few sequences.

Rows go to bench/results/gae.jsonl. GB/s counts the bytes ours must move (read
rewards, values, mask; write advantages, returns) against the measured copy
bandwidth of the device.

Rows are appended as each shape finishes; ``--tiny`` runs one small shape (the GPU
script's dry run).

    .venv/bin/python -m bench.bench_gae [--tiny]
"""

from __future__ import annotations

import argparse

import torch

from bench.harness import append_rows, copy_bandwidth_gbs, print_rows, row, time_fn
from fastrlhf.ops import packed_gae, unpack_to_padded
from fastrlhf.ops.reference import packed_gae_reference, padded_gae_reference

SHAPES = [(256, 4096), (8, 131_072)]
GAMMA, LAM = 1.0, 0.95


def make_batch(batch: int, length: int, device: str):
    n = batch * length
    cu = torch.arange(0, n + 1, length, dtype=torch.int32, device=device)  # [B+1]
    rewards = torch.randn(n, device=device)  # [N]
    values = torch.randn(n, device=device)  # [N]
    mask = torch.rand(n, device=device) > 0.1  # [N]
    bootstrap = torch.randn(batch, device=device)  # [B]
    return rewards, values, cu, mask, bootstrap


def bench_shape(batch: int, length: int, device: str, ceiling_gbs: float) -> list[dict]:
    r, v, cu, m, boot = make_batch(batch, length, device)
    n = r.numel()
    shape = f"{batch}x{length}"
    rows = []

    t_ours = time_fn(lambda: packed_gae(r, v, cu, GAMMA, LAM, m, boot), device, rep=10)
    moved = n * (4 + 4 + 1 + 4 + 4) + cu.numel() * 4 + boot.numel() * 4
    gbs = moved / (t_ours.median_ms * 1e-3) / 1e9
    rows.append(
        row(shape=shape, dtype="float32", provider="ours", pass_="forward", timing=t_ours,
            tokens=n, gb_per_s=gbs, frac_of_copy_bw=gbs / ceiling_gbs)
    )  # fmt: skip

    # the floor of any op that returns two fresh [N] float32 tensors: allocate and
    # write them (on a CPU this is mostly first-touch page faults)
    t_floor = time_fn(lambda: (torch.zeros(n, device=device), torch.zeros(n, device=device)),
                      device, rep=10)  # fmt: skip
    rows.append(
        row(shape=shape, dtype="float32", provider="alloc_write_floor", pass_="forward",
            timing=t_floor, tokens=n)
    )  # fmt: skip

    # padded loop on the first `steps` time steps, scaled to the full length
    rp, vp, mp = (unpack_to_padded(x, cu, fill) for x, fill in ((r, 0.0), (v, 0.0), (m, False)))
    steps = min(length, 4096 if device == "cpu" else 2048)
    sl = lambda x: x[:, :steps].contiguous()  # [B, steps]
    rs, vs, ms = sl(rp), sl(vp), sl(mp)
    t = time_fn(lambda: padded_gae_reference(rs, vs, ms, GAMMA, LAM, boot), device, warmup=1, rep=3)
    scale = length / steps
    t_pad = type(t)(t.median_ms * scale, t.p20_ms * scale, t.p80_ms * scale)
    rows.append(
        row(shape=shape, dtype="float32", provider="padded_loop", pass_="forward", timing=t_pad,
            tokens=n, scaled_from=f"{batch}x{steps} steps, x{scale:g}",
            ours_speedup=t_pad.median_ms / t_ours.median_ms)
    )  # fmt: skip

    if device == "cpu":
        # Python loop on a few sequences (~32K tokens), scaled by the token count
        few = max(1, 32_768 // length)
        cu_few = cu[: few + 1].clone()
        k = int(cu_few[-1])
        args = (r[:k], v[:k], cu_few, GAMMA, LAM, m[:k], boot[:few])
        t = time_fn(lambda: packed_gae_reference(*args), device, warmup=0, rep=1)
        scale = n / k
        t_py = type(t)(t.median_ms * scale, t.p20_ms * scale, t.p80_ms * scale)
        rows.append(
            row(shape=shape, dtype="float32", provider="python_loop", pass_="forward",
                timing=t_py, tokens=n, scaled_from=f"{few}x{length} tokens, x{scale:g}",
                ours_speedup=t_py.median_ms / t_ours.median_ms)
        )  # fmt: skip
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="packed GAE benchmark")
    ap.add_argument("--tiny", action="store_true", help="one small shape (dry run)")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ceiling = copy_bandwidth_gbs(device)
    for batch, length in [(4, 256)] if a.tiny else SHAPES:
        rows = bench_shape(batch, length, device, ceiling)
        for r in rows:
            r["copy_bw_gbs"] = ceiling
            r["threads"] = torch.get_num_threads()
        print_rows(rows)
        print("appended to", append_rows("gae", rows, device))


if __name__ == "__main__":
    main()
