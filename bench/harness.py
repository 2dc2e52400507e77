"""Shared benchmark harness: timing, peak memory, hardware ceilings, result rows.

Every bench/bench_<op>.py compares providers (the PyTorch reference, torch.compile
of it where useful, ours, peers when importable) and appends one JSON row per
(op, shape, dtype, provider, pass) to bench/results/<op>.jsonl. Rows are appended,
never rewritten, so history accumulates; each carries the device, versions, git sha
and date.

A number without a ceiling says little: ``copy_bandwidth_gbs`` and ``matmul_tflops``
measure the same device's ceilings so rows can report a fraction of them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 3,
    rep: int = 20,
    min_time_s: float = 0.0,
) -> Timing:
    """Median / p20 / p80 wall time of ``fn`` in milliseconds.

    On CUDA this is triton.testing.do_bench (L2 flushed between runs, CUDA events);
    on CPU a perf_counter loop of ``rep`` calls after ``warmup`` calls.
    """
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return Timing(med, p20, p80)
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < rep or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return Timing(statistics.median(samples), q[1], q[7])


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak CUDA memory allocated by ``fn`` above what was allocated before it.

    None on CPU, where the caching allocator keeps no such statistic; CPU benchmarks
    that need resident memory measure it in a subprocess (see ``peak_rss_of``).
    """
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def peak_rss_of(code: str) -> int:
    """Peak resident set size (bytes) of a fresh Python process running ``code``.

    Read from VmHWM, which starts afresh with the new address space at exec; ru_maxrss
    would carry the parent's high-water mark across the fork.
    """
    script = (
        code + "\nprint('PEAK_RSS_KB', [l.split()[1] for l in open('/proc/self/status') "
        "if l.startswith('VmHWM')][0])\n"
    )
    out = subprocess.run(
        [os.environ.get("PYTHON", sys.executable), "-c", script],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    line = [x for x in out.splitlines() if x.startswith("PEAK_RSS_KB")][-1]
    return int(line.split()[1]) * 1024


def copy_bandwidth_gbs(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth: (read + write) bytes per second, GB/s."""
    dev = torch.device(device)
    if dev.type != "cuda":
        nbytes = min(nbytes, 256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), dev)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul rate on this device at ``dtype``, TFLOP/s."""
    dev = torch.device(device)
    n = 8192 if dev.type == "cuda" else 1024
    if dev.type != "cuda":
        dtype = torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = time_fn(lambda: a @ b, dev)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def _git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device | str) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_sha": _git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def append_rows(op: str, rows: list[dict], device: torch.device | str) -> Path:
    """Append result rows (each merged with the environment) to bench/results/<op>.jsonl."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{op}.jsonl"
    env = environment(device)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({"op": op, **row, **env}) + "\n")
    return path


def row(
    *,
    shape: str,
    dtype: str,
    provider: str,
    pass_: str,
    timing: Timing | None,
    peak_bytes: int | None = None,
    **extra,
) -> dict:
    """One result row; ``extra`` carries GB/s, TFLOP/s, fraction of ceiling, etc."""
    out = {"shape": shape, "dtype": dtype, "provider": provider, "pass": pass_}
    if timing is not None:
        out.update(asdict(timing))
    out["peak_bytes"] = peak_bytes
    out.update(extra)
    return out


def print_rows(rows: list[dict]) -> None:
    """A compact table on stdout for a person reading the run."""
    keys = ["shape", "dtype", "provider", "pass", "median_ms", "p20_ms", "p80_ms"]
    extra = sorted({k for r in rows for k in r} - set(keys) - {"op"})
    cols = keys + [k for k in extra if not isinstance(rows[0].get(k), dict)]
    print(" | ".join(cols))
    for r in rows:
        cells = []
        for k in cols:
            v = r.get(k)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        print(" | ".join(cells))


def run_bandwidth_bench(
    op: str, cases: Callable[[str], list[tuple]], bench_case: Callable[..., list[dict]]
) -> None:
    """The main() of a memory-bound op's benchmark: measure the copy bandwidth (the
    ceiling), run ``bench_case(*case, device, ceiling)`` for each of ``cases(device)``,
    print the rows and append them to bench/results/<op>.jsonl."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ceiling = copy_bandwidth_gbs(device)
    print(f"device {device}: measured copy bandwidth {ceiling:.1f} GB/s")
    rows = [r for case in cases(device) for r in bench_case(*case, device, ceiling)]
    for r in rows:
        r["copy_bw_gbs"] = ceiling
    print_rows(rows)
    print("appended to", append_rows(op, rows, device))
