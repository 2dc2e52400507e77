"""``make kernel-check``: compile every kernel configuration for real GPUs, on any machine.

No GPU is needed: Triton compiles for a named target with its bundled ptxas
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``) and
``knobs.nvidia.dump_ptxas_log`` gives the registers, spills and shared memory of that
very compile. The CUDA sources (csrc/**/*.cu) go through ``nvcc -Xptxas -v``.

What is compiled: the launchers of ``fastrlhf.kernels`` are called with ``meta`` tensors
at the benchmark shapes (bench/bench_*.py) with the kernels' ``run`` intercepted, so
the exact arguments, constexprs, warps and stages a GPU launch would use are recorded
and nothing runs. An autotuned launch expands into every configuration its pruning
keeps; ``@triton.heuristics`` values are evaluated as Triton does. Each launch is
compiled for sm_90 and sm_80 in every dtype its op accepts (fp32 lm_head inputs in both
precisions the launcher can pick: tf32 and 3xtf32).

It fails (exit 1) on: a compile error; a register spill in a configuration that fits
shared memory (the autotuner could select it); a launch none of whose configurations
fits shared memory; a ``tl.dot`` kernel that does not lower to tensor cores
(``wgmma`` on sm_90, ``mma.sync`` on sm_80); any spill in a CUDA kernel.

Results are cached in ~/.cache/fastrlhf/kernel-check.json (or $FASTRLHF_KERNEL_CHECK_CACHE)
under a hash of the kernel's source
(with its callees), the bound signature, constexprs, options, target and compiler
versions, so only what changed recompiles. Identical compiles are done once.

    .venv/bin/python -m bench.kernel_check [--jobs 2] [--filter linear] [--no-cache]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Shared by every checkout of this user (keys are content hashes, so that is safe):
# a fresh worktree only compiles what differs from what any other one compiled.
CACHE = Path(
    os.environ.get("FASTRLHF_KERNEL_CHECK_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "fastrlhf"
    / "kernel-check.json"
)
TARGETS = (90, 80)
# Opt-in dynamic shared memory per block, bytes: H100/H200 (sm_90), A100 (sm_80).
SMEM_LIMIT = {90: 232448, 80: 166912}
SM_COUNT = {90: 132, 80: 108}

# Benchmark shapes (bench/bench_token_logprobs.py, bench_linear_logprobs.py,
# bench_ppo_loss.py): 8192 rows of a 151936-word vocabulary, hidden 4096, 1M-token losses.
ROWS, VOCAB, HIDDEN = 8192, 151936, 4096
LOSS_N, PADDED, PACKED_SEQS = 1 << 20, (256, 4096), 512
DTYPES = ("bf16", "fp16", "fp32")

_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


@dataclasses.dataclass
class Case:
    """One compile: a kernel specialisation for one target."""

    kernel: str
    launch: str  # the launch it belongs to (for "no config fits shared memory")
    dtype: str
    config: str
    target: int
    autotuned: bool
    key: str = ""
    jit: object = None
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    src: str = ""  # CUDA source path, for nvcc cases
    result: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------ recording launches


@contextlib.contextmanager
def _recording(calls: list, *modules):
    """Replace ``run`` of every Triton kernel object of ``modules`` by a recorder."""
    from triton.runtime.jit import KernelInterface

    patched = {}
    for mod in modules:
        for obj in vars(mod).values():
            if isinstance(obj, KernelInterface) and id(obj) not in patched:
                patched[id(obj)] = (obj, obj.__dict__.get("run"))

                def run(*args, _obj=obj, grid=None, warmup=False, **kwargs):
                    calls.append((_obj, args, kwargs))

                obj.run = run
    try:
        yield
    finally:
        for obj, old in patched.values():
            if old is None:
                del obj.run
            else:
                obj.run = old


def _expand(obj, args, kwargs, label=""):
    """(jit function, kwargs, config label) for every compile a GPU launch could do."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    if isinstance(obj, Autotuner):
        obj.nargs = dict(zip(obj.arg_names, args))
        try:
            configs = obj.prune_configs(dict(kwargs))
        finally:
            obj.nargs = None
        for cfg in configs:
            lab = ",".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in cfg.kwargs.items())
            yield from _expand(obj.fn, args, {**kwargs, **cfg.all_kwargs()}, lab)
    elif isinstance(obj, Heuristics):
        kw = dict(kwargs)
        for name, fn in obj.values.items():
            kw[name] = fn({**dict(zip(obj.arg_names, args)), **kw})
        yield from _expand(obj.fn, args, kw, label)
    elif isinstance(obj, JITFunction):
        yield obj, kwargs, label
    else:
        raise TypeError(f"unexpected kernel wrapper {type(obj)}")


def _launches(dtypes, only):
    """[(launch label, dtype, [(kernel object, args, kwargs)])] at the benchmark shapes."""
    import torch

    from fastrlhf.kernels import linear_logprobs as kll
    from fastrlhf.kernels import logprobs as klp
    from fastrlhf.kernels import losses as kls

    def m(shape, dt):
        return torch.empty(shape, dtype=dt, device="meta")

    f32, i64, i32 = torch.float32, torch.int64, torch.int32
    out = []

    def record(label, dl, fn, *a, **k):
        if only and not any(s in label for s in only):
            return
        calls = []
        with _recording(calls, klp, kll, kls):
            fn(*a, **k)
        out.append((label, dl, calls))

    for dl in dtypes:
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": f32}[dl]
        # token_logprobs reads logits[:, :-1] of [8, 1025, V] in place: layout (T, sB, sT)
        full = m((8, ROWS // 8 + 1, VOCAB), dt)
        layout = (ROWS // 8, full.stride(0), full.stride(1))
        labels, vec = m((ROWS,), i64), m((ROWS,), f32)
        for ent in (False, True):
            record(f"token_logprobs_fwd ent={ent:d}", dl, klp.token_logprobs_fwd,
                   full, layout, labels, 1.0, -100, VOCAB, ent)  # fmt: skip
            grad = m((ROWS, VOCAB), dt)
            for inplace in (False, True):
                dst, d_layout = (full, layout) if inplace else (grad, (ROWS, 0, VOCAB))
                ents = (vec, vec) if ent else (None, None)
                record(f"token_logprobs_bwd ent={ent:d} inplace={inplace:d}", dl,
                       klp.token_logprobs_bwd, full, layout, dst, d_layout, labels, vec,
                       ents[0], vec, ents[1], 1.0, -100, VOCAB)  # fmt: skip

        hidden, weight = m((ROWS, HIDDEN), dt), m((VOCAB, HIDDEN), dt)
        precisions = ["tf32", "tf32x3"] if dl == "fp32" else [None]
        for prec in precisions:
            tag = f" {prec}" if prec else ""
            for cap in TARGETS:  # the split count depends on the SM count
                for ent in (False, True):
                    record(f"linear_fwd ent={ent:d}{tag} sm{cap}", dl, kll.linear_logprobs_fwd,
                           hidden, weight, labels, None, 1.0, VOCAB, ent,
                           sm_count=SM_COUNT[cap], precision=prec)  # fmt: skip
            vb = (1 << 25) // ROWS  # one vocabulary block of the backward (ops)
            buf = m((ROWS, vb), dt)
            for ent in (False, True):
                record(f"linear_dlogits ent={ent:d}{tag}", dl, kll.linear_logprobs_dlogits,
                       hidden, weight, labels, None, vec, vec, vec, vec if ent else None,
                       1.0, VOCAB, vb, 2 * vb, buf, precision=prec)  # fmt: skip

        x = m((LOSS_N,), dt)
        for code, st, name in ((0, False, "k1"), (1, False, "abs"), (2, False, "k2"),
                               (3, False, "k3"), (3, True, "k3+st")):  # fmt: skip
            if not st:
                record(f"kl_fwd {name}", dl, kls.kl_penalty_fwd, x, x, code, st)
            record(f"kl_bwd {name}", dl, kls.kl_penalty_bwd, x, x, m((LOSS_N,), f32), code, st)

        cu = m((PACKED_SEQS + 1,), i32)
        layouts = {"padded": (None, PADDED[1], PADDED[0]), "packed": (cu, 0, PACKED_SEQS)}
        mask = m((LOSS_N,), torch.uint8)
        ent_vec = m((LOSS_N,), f32)
        for lay, dual, kl, has_ent, agg in (("padded", None, None, False, 0),
                                            ("packed", 3.0, (3, False), True, 1),
                                            ("packed", None, (3, True), True, 2)):  # fmt: skip
            cu_, t, s = layouts[lay]
            code, st = kl or (3, False)
            ref = x if kl else None
            common = (0.2, 0.2, dual, 0.1 if kl else 0.0, code, st, 0.01 if has_ent else 0.0)
            tag = f"{lay} dual={dual is not None:d} kl={kl is not None:d} ent={has_ent:d}"
            stats, partials = m((kls.K,), f32), m((s, kls.K), f32)
            record(f"ppo_fwd {tag}", dl, kls.ppo_fwd, x, x, x, mask, ref,
                   ent_vec if has_ent else None, cu_, t, s, *common, agg)  # fmt: skip
            record(f"ppo_bwd {tag}", dl, kls.ppo_bwd, x, x, x, mask, ref, cu_, partials,
                   stats, stats, t, s, *common, has_ent, agg)  # fmt: skip
        for lay, clip, agg in (("padded", 0.2, 0), ("packed", None, 1), ("packed", 0.2, 2)):
            cu_, t, s = layouts[lay]
            stats, partials = m((kls.K,), f32), m((s, kls.K), f32)
            tag = f"{lay} clip={clip is not None:d}"
            record(f"value_fwd {tag}", dl, kls.value_fwd, x, x, x, mask, cu_, t, s, clip, agg)
            record(f"value_bwd {tag}", dl, kls.value_bwd, x, x, x, mask, cu_, partials, stats,
                   stats, t, s, clip, agg)  # fmt: skip
    return out


# ----------------------------------------------------------------------- the compiles


def _bind(jit, args, kwargs, cap):
    """Triton's own binding of a launch: (options, signature, constexprs, attrs)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", cap, 32))
    kw = dict(kwargs)
    kw["debug"] = kw.get("debug", jit.debug) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, spec, opts = binder(*args, **kw)
    return jit._pack_args(backend, kw, bound, spec, opts)


def _triton_cases(dtypes, only) -> list[Case]:
    import triton

    cases = []
    for label, dl, calls in _launches(dtypes, only):
        if not calls:
            raise RuntimeError(f"launch {label} ({dl}) made no kernel call")
        for obj, args, kwargs in calls:
            autotuned = type(obj).__name__ == "Autotuner"
            for jit, kw, cfg in _expand(obj, args, kwargs):
                for cap in TARGETS:
                    if " sm" in label and not label.endswith(f"sm{cap}"):
                        continue
                    options, sig, constexprs, attrs = _bind(jit, args, kw, cap)
                    cfg_full = f"{cfg} w{options.num_warps} s{options.num_stages}".strip()
                    raw = repr((jit.cache_key, sorted(sig.items()), sorted(constexprs.items()),
                                sorted(attrs.items()), sorted(options.__dict__.items()), cap,
                                triton.__version__))  # fmt: skip
                    key = hashlib.sha256(raw.encode()).hexdigest()
                    cases.append(Case(jit.__name__, f"{label}|{dl}", dl, cfg_full, cap, autotuned,
                                      key, jit, args, kw))  # fmt: skip
    return cases


def _compile_triton(case: Case) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a fresh ptxas run, so the log is this one's
    options, sig, constexprs, attrs = _bind(case.jit, case.args, case.kwargs, case.target)
    log = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(log):
            ck = triton.compile(
                ASTSource(case.jit, sig, constexprs, attrs),
                target=GPUTarget("cuda", case.target, 32),
                options=options.__dict__,
            )
    except Exception as e:  # noqa: BLE001 - a failure is a result
        return {"error": f"{type(e).__name__}: {e}"[:2000], "secs": time.time() - t0}
    text = log.getvalue()
    res = {k: int(m.group(1)) if (m := rx.search(text)) else 0 for k, rx in _PTXAS.items()}
    ptx = ck.asm["ptx"]
    res.update(
        smem=ck.metadata.shared,
        dot="tt.dot" in str(ck.asm.get("ttir", "")),
        mma="wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-",
        secs=round(time.time() - t0, 2),
    )
    return res


def _nvcc() -> str | None:
    return os.environ.get("NVCC") or shutil.which("nvcc")


def _cuda_cases() -> list[Case]:
    nvcc = _nvcc()
    if nvcc is None:
        return []
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    srcs = sorted(glob.glob(str(ROOT / "csrc" / "**" / "*.cu"), recursive=True))
    headers = sorted(glob.glob(str(ROOT / "csrc" / "**" / "*.h*"), recursive=True))
    blob = b"".join(Path(p).read_bytes() for p in srcs + headers) + version.encode()
    cases = []
    for src in srcs:
        for cap in TARGETS:
            key = hashlib.sha256(blob + f"{src}|{cap}".encode()).hexdigest()
            rel = os.path.relpath(src, ROOT)
            cases.append(Case(rel, rel, "-", "-O3", cap, False, key, src=src))
    return cases


def _compile_cuda(case: Case) -> dict:
    """nvcc -Xptxas -v of one .cu: {"functions": [{kernel, regs, spill_st, spill_ld, smem}]}."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [_nvcc(), "-c", "-std=c++20", "-O3", f"-arch=sm_{case.target}", "-Xptxas", "-v",
               f"-I{ROOT / 'csrc'}", case.src, "-o", os.path.join(tmp, "x.o")]  # fmt: skip
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        return {"error": p.stderr[-2000:], "secs": time.time() - t0}
    funcs, cur = [], None
    for line in p.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            cur = {"kernel": m.group(1), "regs": 0, "spill_st": 0, "spill_ld": 0, "smem": 0}
            funcs.append(cur)
        elif cur is not None:
            for k, rx in _PTXAS.items():
                if mm := rx.search(line):
                    cur[k] = int(mm.group(1))
            if mm := re.search(r"(\d+) bytes smem", line):
                cur["smem"] = int(mm.group(1))
    names = [f["kernel"] for f in funcs]
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    if filt and names:
        out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
        for f, name in zip(funcs, out.stdout.splitlines()):
            name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
            f["kernel"] = re.sub(r"\(.*$", "", name.replace("fastrlhf::cuda::", ""))
    return {"functions": funcs, "secs": round(time.time() - t0, 2)}


_WORK: list[Case] = []


def _run_one(i: int) -> dict:
    case = _WORK[i]
    return _compile_cuda(case) if case.src else _compile_triton(case)


# -------------------------------------------------------------------------- judging


def _rows(cases: list[Case]) -> list[dict]:
    rows = []
    for c in cases:
        r = c.result
        base = dict(kernel=c.kernel, launch=c.launch, dtype=c.dtype, config=c.config,
                    target=f"sm_{c.target}", autotuned=c.autotuned, cap=c.target)  # fmt: skip
        if "error" in r:
            rows.append({**base, "error": r["error"]})
        elif c.src:
            for f in r["functions"]:
                rows.append({**base, **f, "mma": "", "dot": False})
        else:
            rows.append({**base, **r})
    return rows


def judge(rows: list[dict]) -> list[str]:
    """Give each row a verdict; return the problems."""
    problems = []
    fits_any: dict[tuple, bool] = {}
    for r in rows:
        r["fits"] = "error" not in r and r["smem"] <= SMEM_LIMIT[r["cap"]]
        key = (r["launch"], r["cap"])
        fits_any[key] = fits_any.get(key, False) or r["fits"]
    for r in rows:
        where = f"{r['kernel']} [{r['launch']}] {r['target']} {r['config']}"
        if "error" in r:
            r["verdict"] = "COMPILE ERROR"
            problems.append(f"compile error: {where}: {r['error'][:400]}")
        elif not r["fits"]:
            if r["autotuned"] and fits_any[(r["launch"], r["cap"])]:
                r["verdict"] = "smem>limit (never selected)"
            else:
                r["verdict"] = "SMEM>LIMIT"
                problems.append(f"shared memory {r['smem']} B > {SMEM_LIMIT[r['cap']]}: {where}")
        elif r["spill_st"] or r["spill_ld"]:
            r["verdict"] = "SPILLS"
            problems.append(f"spills {r['spill_st']}/{r['spill_ld']} B st/ld: {where}")
        elif r["dot"] and r["mma"] != ("wgmma" if r["cap"] >= 90 else "mma"):
            r["verdict"] = "NO TENSOR CORES"
            problems.append(f"tl.dot lowered to {r['mma']}, not tensor-core MMA: {where}")
        else:
            r["verdict"] = "ok"
    return problems


def print_table(rows: list[dict], out=sys.stdout) -> None:
    cols = ["kernel", "launch", "target", "dtype", "config", "regs", "spills", "smem", "MMA",
            "verdict"]  # fmt: skip
    table = []
    for r in rows:
        ok = "error" not in r
        table.append([
            r["kernel"], r["launch"].split("|")[0], r["target"], r["dtype"], r["config"],
            str(r["regs"]) if ok else "-",
            f"{r['spill_st']}/{r['spill_ld']}" if ok else "-",
            str(r["smem"]) if ok else "-", r.get("mma", "") if ok else "-", r["verdict"],
        ])  # fmt: skip
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(cols)]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)), file=out)
    print("-+-".join("-" * w for w in widths), file=out)
    for t in table:
        print(" | ".join(c.ljust(w) for c, w in zip(t, widths)), file=out)


def _save(cache: dict) -> None:
    """Merge into the file (another checkout may have written it meanwhile), atomically."""
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    merged = {}
    with contextlib.suppress(OSError, ValueError):
        merged = json.loads(CACHE.read_text())
    merged.update(cache)
    tmp = CACHE.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged))
    os.replace(tmp, CACHE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--filter", default="", help="comma list of substrings of launch labels")
    ap.add_argument("--no-cache", action="store_true", help="recompile everything")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc checks")
    ap.add_argument("--json", help="write every row here")
    a = ap.parse_args(argv)
    # The interpreter replaces every real compile: this check needs it off.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from triton import knobs

    knobs.runtime.interpret = False
    t_start = time.time()
    only = [s for s in a.filter.split(",") if s]
    cases = _triton_cases([d for d in a.dtypes.split(",") if d], only)
    if not a.no_cuda and not only:
        cases += _cuda_cases()
        if _nvcc() is None:
            print("nvcc not found: CUDA sources not checked", file=sys.stderr)
    cache = {}
    if CACHE.exists() and not a.no_cache:
        with contextlib.suppress(ValueError):
            cache = json.loads(CACHE.read_text())
    todo = {}
    for c in cases:
        if c.key in cache:
            c.result = cache[c.key]
        else:
            todo.setdefault(c.key, c)
    print(f"{len(cases)} compiles ({len(set(c.key for c in cases))} distinct), "
          f"{len(todo)} not cached, {a.jobs} job(s)", file=sys.stderr)  # fmt: skip
    global _WORK
    _WORK = list(todo.values())
    if _WORK:
        import multiprocessing as mp

        idx = range(len(_WORK))
        if a.jobs > 1:
            # fork: the workers inherit the recorded launches (nothing to rebuild)
            with ProcessPoolExecutor(a.jobs, mp.get_context("fork")) as ex:
                results = list(ex.map(_run_one, idx))
        else:
            results = [_run_one(i) for i in idx]
        for c, r in zip(_WORK, results):
            cache[c.key] = r
        _save(cache)
    for c in cases:
        c.result = cache[c.key]
    rows = _rows(cases)
    problems = judge(rows)
    print_table(rows)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    counts = {v: sum(r["verdict"] == v for r in rows) for v in sorted({r["verdict"] for r in rows})}
    print(f"\n{len(rows)} rows in {time.time() - t_start:.0f}s: "
          + ", ".join(f"{n} {v}" for v, n in counts.items()))  # fmt: skip
    if problems:
        print(f"{len(problems)} problem(s):")
        for p in problems:
            print("  - " + p)
        return 1
    print("kernel-check passed: every selectable configuration compiles for "
          + ", ".join(f"sm_{t}" for t in TARGETS) + " without spills")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
