"""Shared benchmark harness: timing, peak memory, hardware ceilings, result rows.

Every bench/bench_<op>.py compares providers (the PyTorch reference, torch.compile
of it where useful, ours, peers when importable) and appends one JSON row per
(op, shape, dtype, provider, pass) to bench/results/<op>.jsonl. Rows are appended,
never rewritten, so history accumulates; each carries the device, versions, git sha
and date.

A number without a ceiling says little: ``copy_bandwidth_gbs`` and ``matmul_tflops``
measure the same device's ceilings, ``datasheet_bf16_tflops`` names the vendor's dense
bf16 peak, and ``cost_fields`` turns an op's cost formula (bytes it must move, FLOPs
it must do) into GB/s, TFLOP/s and the fractions of those named peaks.

``measure`` reports three times per call: the device time (CUDA events around each
call, L2 flushed: triton.testing.do_bench), the host time to issue one call (no sync:
what the Python wrappers and launches cost the CPU) and, from the profiler, the summed
time and count of the kernels one call launches. A host time above the kernel time
means the op is launch-bound at that size.
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


def host_ms_per_call(
    fn: Callable[[], object], device: torch.device | str, calls: int = 10
) -> float:
    """Wall time for the host to issue one call, without waiting for the device."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / calls
    _sync(device)
    return host


def kernel_time(fn: Callable[[], object], device: torch.device | str, calls: int = 5):
    """(summed kernel milliseconds, kernel launches) per call, from torch.profiler; on CPU,
    or when the profiler has no CUDA activity, (None, None)."""
    if torch.device(device).type != "cuda":
        return None, None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        return None, None
    total_us = sum(e.device_time_total for e in kernels)
    return total_us / 1e3 / calls, len(kernels) / calls


def measure(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 3,
    rep: int = 20,
) -> dict:
    """Device time (median/p20/p80 ms), host issue time and profiled kernel time per call."""
    t = time_fn(fn, device, warmup=warmup, rep=rep)
    kernel_ms, launches = kernel_time(fn, device)
    return {
        **asdict(t),
        "host_ms": host_ms_per_call(fn, device),
        "kernel_ms": kernel_ms,
        "kernels_per_call": launches,
    }


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, by a
# substring of torch.cuda.get_device_name(); the first match wins.
_DATASHEET_BF16_TFLOPS = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM
    ("A100", 312.0),
    ("L40S", 362.05),
    ("A10G", 70.0),
]


def datasheet_bf16_tflops(device: torch.device | str) -> tuple[str, float | None]:
    """(name of the peak, TFLOP/s) for this device, or (name, None) when unknown."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu (no datasheet peak)", None
    name = torch.cuda.get_device_name(dev)
    for key, tflops in _DATASHEET_BF16_TFLOPS:
        if key in name:
            return f"{key} dense bf16 datasheet", tflops
    return f"{name} (no datasheet entry)", None


@dataclass
class Ceilings:
    """The named peaks a row is compared with."""

    copy_gbs: float  # measured device-to-device copy, read + write bytes per second
    peak_name: str
    peak_tflops: float | None  # datasheet dense bf16

    @classmethod
    def of(cls, device: torch.device | str) -> Ceilings:
        name, tflops = datasheet_bf16_tflops(device)
        return cls(copy_bandwidth_gbs(device), name, tflops)


def cost_fields(nbytes: float, flops: float, median_ms: float, ceil: Ceilings) -> dict:
    """An op's cost formula (bytes it must move, FLOPs it must do) at a measured time."""
    sec = median_ms * 1e-3
    gbs = nbytes / sec / 1e9
    tflops = flops / sec / 1e12
    return {
        "bytes": int(nbytes),
        "flops": int(flops),
        "gb_per_s": gbs,
        "frac_of_copy_bw": gbs / ceil.copy_gbs,
        "copy_bw_gbs": ceil.copy_gbs,
        "tflops": tflops,
        "frac_of_peak_flops": tflops / ceil.peak_tflops if ceil.peak_tflops else None,
        "peak": ceil.peak_name,
    }


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


def results_dir() -> Path:
    """bench/results, or $FASTRLHF_BENCH_RESULTS (the GPU script's dry run writes apart)."""
    return Path(os.environ.get("FASTRLHF_BENCH_RESULTS", RESULTS_DIR))


def append_rows(op: str, rows: list[dict], device: torch.device | str) -> Path:
    """Append result rows (each merged with the environment) to bench/results/<op>.jsonl.

    Call it once per measured row (or small group) so a run that is stopped keeps what
    it measured."""
    out_dir = results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{op}.jsonl"
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


_SHOWN = ["host_ms", "kernel_ms", "kernels_per_call", "gb_per_s", "frac_of_copy_bw", "tflops",
          "frac_of_peak_flops", "peak_bytes"]  # fmt: skip


def print_rows(rows: list[dict]) -> None:
    """A compact table on stdout for a person reading the run."""
    if not rows:
        return
    keys = ["shape", "dtype", "provider", "pass", "median_ms"]
    present = {k for r in rows for k in r}
    cols = keys + [k for k in _SHOWN if k in present]
    print(" | ".join(cols))
    for r in rows:
        cells = []
        for k in cols:
            v = r.get(k)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        print(" | ".join(cells))
