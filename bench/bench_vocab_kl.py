"""linear_vocab_kl: CPU peak resident memory of forward + backward at a Qwen-size vocabulary.

The fused op never holds either model's [N, V] logits; the unfused computation holds two
float32 [N, V] tensors plus their log-softmaxes (``logits_bytes`` per tensor, reported,
not run: at N=4096, V=151,936 it would need > 10 GB on a shared machine). The row
records the peak RSS of a fresh process above ``import torch, fastrlhf.ops`` and the
inputs, and the wall time of that process (imports included). GPU rows are owed (no Triton
kernel yet).
"""

from __future__ import annotations

import time

import torch

from bench import harness

OP = "vocab_kl"

_RSS_CODE = """
import torch
from fastrlhf.ops import linear_vocab_kl
torch.manual_seed(0)
n, h, v = {n}, {h}, {v}
hidden = torch.randn(n, h).requires_grad_()
weight = (torch.randn(v, h) * h ** -0.5).requires_grad_()
ref_hidden = torch.randn(n, h)
ref_weight = torch.randn(v, h) * h ** -0.5
kl = linear_vocab_kl(hidden, weight, ref_hidden, ref_weight, validate=False, impl="torch")
torch.autograd.grad(kl.sum(), (hidden, weight))
"""


def cpu_rss_rows(n=4096, h=256, v=151936) -> list[dict]:
    base = harness.peak_rss_of("import torch, fastrlhf.ops")
    inputs = 2 * (n * h + v * h) * 4
    grads = (n * h + v * h) * 4  # dhidden and dweight are outputs, also in the peak
    t0 = time.perf_counter()
    peak = harness.peak_rss_of(_RSS_CODE.format(n=n, h=h, v=v))
    wall = time.perf_counter() - t0
    return [
        harness.row(
            shape=f"N={n} H={h} V={v}",
            dtype="float32",
            provider="ours-chunked-torch",
            pass_="full",
            timing=None,
            peak_rss_bytes=peak,
            rss_above_inputs_bytes=peak - base - inputs,
            grads_bytes=grads,
            logits_bytes=n * v * 4,
            process_wall_s=wall,
        )
    ]


def main() -> None:
    device = torch.device("cpu")
    rows = cpu_rss_rows()
    harness.print_rows(rows)
    path = harness.append_rows(OP, rows, device)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
