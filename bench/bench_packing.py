"""Benchmark: packing sequence lengths into micro-batches (fastrlhf.data.packing).

Providers: "numba" (``pack_sequences``) and "python" (``pack_sequences_reference``, the
same algorithms in pure Python). Passes: "ffd" (first-fit decreasing, one rank) and
"kk8" (Karmarkar–Karp over 8 ranks, then FFD per rank). Packing runs on the host, so
the sizes are the same on every machine: 1M lengths for numba (the target is < 1 s on
one core), and the pure-Python version at a size it finishes quickly; the speed-up is
measured at equal size. Lengths are log-normal (median ~300 tokens) clipped to
[1, 4096], budget 16384 tokens per micro-batch.

Run: .venv/bin/python -m bench.bench_packing
"""

from __future__ import annotations

import numpy as np

from bench.harness import append_rows, print_rows, row, time_fn
from fastrlhf.data.packing import pack_sequences, pack_sequences_reference

MAX_TOKENS = 16384
NUMBA_N = 1_000_000
PYTHON_N = 100_000


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=5.7, sigma=0.9, size=n), 1, 4096).astype(np.int64)


def _measure(pass_: str, algorithm: str, ranks: int) -> list[dict]:
    pack_sequences(_lengths(1000), MAX_TOKENS, algorithm, ranks)  # compile first
    small = _lengths(PYTHON_N)
    small_list = small.tolist()
    t_py = time_fn(
        lambda: pack_sequences_reference(small_list, MAX_TOKENS, algorithm, ranks),
        warmup=0,
        rep=1,
    )
    t_small = time_fn(lambda: pack_sequences(small, MAX_TOKENS, algorithm, ranks), warmup=1, rep=5)
    big = _lengths(NUMBA_N)
    t_big = time_fn(lambda: pack_sequences(big, MAX_TOKENS, algorithm, ranks), warmup=1, rep=5)
    bins = pack_sequences(big, MAX_TOKENS, algorithm, ranks)
    fill = float(big.sum()) / (len(bins) * MAX_TOKENS)  # mean occupancy of a micro-batch
    common = dict(dtype="int64", pass_=pass_, max_tokens=MAX_TOKENS, num_ranks=ranks)
    return [
        row(shape=f"n={PYTHON_N}", provider="python", timing=t_py, **common),
        row(
            shape=f"n={PYTHON_N}",
            provider="numba",
            timing=t_small,
            speedup_vs_python=t_py.median_ms / t_small.median_ms,
            **common,
        ),
        row(
            shape=f"n={NUMBA_N}",
            provider="numba",
            timing=t_big,
            micro_batches=len(bins),
            fill=fill,
            **common,
        ),
    ]


def main() -> None:
    rows = _measure("ffd", "ffd", 1) + _measure("kk8", "kk", 8)
    print_rows(rows)
    path = append_rows("packing", rows, "cpu")
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
