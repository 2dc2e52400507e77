"""Rollout generation throughput: ``fastrlhf.rollout.generate`` vs HF ``model.generate``.

Providers (same random-init Llama, same prompts, sampling at T = 1, no EOS so every
provider decodes exactly R tokens per row):

    ours           generate() with a ReusableKVCache kept across calls (reset, no realloc)
    ours_fresh     generate() with a new cache per call (allocation every rollout)
    hf_generate    transformers' model.generate (its default dynamic cache), for reference;
                   it also records no log-probs, which ours does

Reported: median / p20 / p80 ms per rollout, generated tokens per second, peak memory
(CUDA) and the KV cache size. Decode is latency-bound at these sizes, so the ceiling that
matters is the per-step weight read: ``weight_bytes / copy_bandwidth`` per step, reported
as ``floor_ms`` (the time R steps would take if each only read the weights once at the
measured copy bandwidth).

Run: ``.venv/bin/python -m bench.bench_rollout`` (CPU: a small model in < 1 minute;
CUDA: a TinyLlama-1.1B-shaped model in bf16, B = 64, P = 128, R = 128).

``--decode`` (issue 18) compares the decode paths of ``generate`` with keyed sampling:

    ours_eager     GenerationConfig(compile="off"): the decode step run op by op
    ours_compiled  compile="on": torch.compile(fullgraph) of the step, at a power-of-two
                   batch bucket; on CUDA replayed as one CUDA graph per step
    hf_generate    transformers' model.generate (dynamic cache, its own sampling)

at CPU: a Llama with 4 layers, hidden 512, vocabulary 32000, fp32, B = 32, P <= 64,
R = 128; CUDA: the Qwen2.5-0.5B shape (24 layers, hidden 896, 14 heads / 2 KV heads,
vocabulary 151936, tied embeddings), bf16, B = 64, P <= 128, R = 256. Rows carry
``aten_ops_per_token`` (ops the eager path dispatches per decoded token, counted with a
TorchDispatchMode) and ``kernels_per_step`` (kernel calls in the ``call()`` of Inductor's
generated code for the compiled step: fused C++/Triton kernels, extern GEMMs and ATen
fallbacks), plus the one-time compile seconds. The GPU session runs
``python -m bench.bench_rollout --decode``.
"""

from __future__ import annotations

import argparse
import re
import time
from unittest import mock

import torch

from bench.harness import (
    append_rows,
    copy_bandwidth_gbs,
    peak_memory_bytes,
    print_rows,
    row,
    time_fn,
)
from fastrlhf.rollout import (
    GenerationConfig,
    ReusableKVCache,
    generate,
    pack_prompts,
    sequence_keys,
)


def _model(device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if device.type == "cuda":
        cfg = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                   num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)  # fmt: skip
        dtype, batch, prompt, new = torch.bfloat16, 64, 128, 128
    else:
        cfg = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, vocab_size=2000)  # fmt: skip
        dtype, batch, prompt, new = torch.float32, 8, 32, 16
    config = LlamaConfig(**cfg, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    return model, dtype, batch, prompt, new


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, dtype, batch, prompt, new = _model(device)
    vocab = model.config.vocab_size
    g = torch.Generator(device=device).manual_seed(0)
    # prompt lengths from P/2 to P: left padding is exercised
    lens = torch.randint(prompt // 2, prompt + 1, (batch,)).tolist()
    prompts = [torch.randint(1, vocab, (n,), device=device) for n in lens]
    ids, cu = pack_prompts(prompts)
    cfg = GenerationConfig(max_new_tokens=new, temperature=1.0, eos_token_id=None)
    kv = ReusableKVCache()

    def ours():
        return generate(model, ids, cu, cfg, kv_cache=kv, generator=g)

    def ours_fresh():
        return generate(model, ids, cu, cfg, kv_cache=ReusableKVCache(), generator=g)

    # HF generate on the same left-padded prompts
    width = max(lens)
    padded = torch.zeros(batch, width, dtype=torch.long, device=device)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        padded[b, width - p.numel() :] = p
        mask[b, width - p.numel() :] = 1

    def hf():
        with torch.no_grad():
            return model.generate(
                input_ids=padded, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                eos_token_id=None,
            )  # fmt: skip

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth_gbs(device)
    floor_ms = new * weight_bytes / (bw * 1e9) * 1e3  # bw counts bytes moved (read + write)
    shape = f"B={batch} P<={prompt} R={new} L={model.config.num_hidden_layers} V={vocab}"
    rows = []
    ours()  # allocates the cache once
    kv_bytes = kv.nbytes()
    for name, fn in (("ours", ours), ("ours_fresh", ours_fresh), ("hf_generate", hf)):
        timing = time_fn(fn, device, warmup=1, rep=3)
        rows.append(
            row(
                shape=shape,
                dtype=str(dtype).replace("torch.", ""),
                provider=name,
                pass_="generate",
                timing=timing,
                peak_bytes=peak_memory_bytes(fn, device),
                tokens_per_s=batch * new / (timing.median_ms * 1e-3),
                floor_ms=floor_ms,
                kv_cache_bytes=kv_bytes if name.startswith("ours") else None,
                weight_bytes=weight_bytes,
                copy_gbs=bw,
            )
        )
    print_rows(rows)
    print("->", append_rows("rollout", rows, device))


# ---------------------------------------------------------------- --decode (issue 18)
_KERNEL_CALL = re.compile(
    r"^\s+(?:\w+ = )?"
    r"(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|torch\.ops\.\w+\.\w+\.\w+)\(",
    re.M,
)


def kernel_calls(code: str) -> dict[str, int]:
    """Kernel calls in the ``call()`` of an Inductor output module, by kind."""
    body = code[code.index("def call(") :]
    out = {"fused": 0, "extern": 0, "aten_fallback": 0}
    for name in _KERNEL_CALL.findall(body):
        kind = "extern" if name.startswith("extern_kernels") else "fused"
        out["aten_fallback" if name.startswith("torch.ops") else kind] += 1
    return out


def _decode_model(device: torch.device):
    if device.type == "cuda":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
            max_position_embeddings=4096, tie_word_embeddings=True,
        )  # fmt: skip
        model, shape = Qwen2ForCausalLM(config), dict(dtype=torch.bfloat16, B=64, P=128, R=256)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
            max_position_embeddings=4096, tie_word_embeddings=False,
        )  # fmt: skip
        model, shape = LlamaForCausalLM(config), dict(dtype=torch.float32, B=32, P=64, R=128)
    return model.to(device=device, dtype=shape["dtype"]).eval(), shape


def _aten_ops(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def _timed(fn, device: torch.device, rep: int) -> list[float]:
    """Wall ms of ``rep`` calls (each call is seconds long: no need for do_bench)."""
    out = []
    for _ in range(rep):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def decode_main(rep: int) -> None:
    from torch._inductor.graph import GraphLowering

    from bench.harness import Timing

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, sh = _decode_model(device)
    B, P, R, vocab = sh["B"], sh["P"], sh["R"], model.config.vocab_size
    lens = torch.randint(P // 2, P + 1, (B,)).tolist()
    prompts = [torch.randint(1, vocab, (n,), device=device) for n in lens]
    ids, cu = pack_prompts(prompts)
    keys = sequence_keys(0, 0, torch.arange(B, device=device))
    base = dict(max_new_tokens=R, temperature=1.0, eos_token_id=None)
    kv = {"off": ReusableKVCache(), "on": ReusableKVCache()}

    def ours(mode, r=R):
        cfg = GenerationConfig(**dict(base, max_new_tokens=r), compile=mode)
        return generate(model, ids, cu, cfg, kv_cache=kv[mode], sample_keys=keys)

    width = max(lens)
    padded = torch.zeros(B, width, dtype=torch.long, device=device)
    mask = torch.zeros(B, width, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        padded[b, width - p.numel() :] = p
        mask[b, width - p.numel() :] = 1

    def hf():
        with torch.no_grad():
            return model.generate(
                input_ids=padded, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=R, min_new_tokens=R, pad_token_id=0,
                eos_token_id=None,
            )  # fmt: skip

    t_start = time.perf_counter()

    def progress(what: str) -> None:  # a CPU run takes minutes: say where it is
        print(f"[{time.perf_counter() - t_start:7.1f} s] {what}", flush=True)

    # eager ops per decoded token: (R = 9) - (R = 1) rollouts, over the 8 extra tokens
    ops_per_token = (_aten_ops(lambda: ours("off", 9)) - _aten_ops(lambda: ours("off", 1))) / 8
    progress(f"eager ATen ops per decoded token: {ops_per_token:.0f}")
    # first compiled rollout: compile once, keeping Inductor's output code (no FX cache hit)
    codes: list[str] = []
    t0 = time.perf_counter()
    with (
        mock.patch.object(GraphLowering, "save_output_code", codes.append),
        torch._inductor.config.patch(fx_graph_cache=False),
    ):
        compiled = ours("on")
    compile_s = time.perf_counter() - t0
    kernels = kernel_calls(codes[-1]) if codes else {}
    progress(f"first compiled rollout {compile_s:.1f} s, kernels per step {kernels}")
    eager = ours("off")  # also the eager path's warm-up
    same = torch.equal(compiled.input_ids, eager.input_ids)
    progress(f"compiled tokens == eager tokens: {same}")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    shape = f"B={B} P<={P} R={R} L={c.num_hidden_layers} H={c.hidden_size} V={vocab}"
    rows = []
    for name, fn in (
        ("ours_eager", lambda: ours("off")),
        ("ours_compiled", lambda: ours("on")),
        ("hf_generate", hf),
    ):
        if name != "ours_eager":  # warmed up above
            fn()  # warm-up (the compiled path: graphs captured on CUDA)
        ms = sorted(_timed(fn, device, rep))
        progress(f"{name}: {ms} ms")
        timing = Timing(ms[len(ms) // 2], ms[0], ms[-1])
        extra = {}
        if name == "ours_eager":
            extra = dict(aten_ops_per_token=ops_per_token)
        elif name == "ours_compiled":
            extra = dict(
                kernels_per_step=sum(kernels.values()), kernels=kernels,
                compile_s=compile_s, tokens_equal_eager=same,
                graphs=sum(g.graph is not None for g in kv["on"].graphs.values()),
            )  # fmt: skip
        rows.append(
            row(
                shape=shape,
                dtype=str(sh["dtype"]).replace("torch.", ""),
                provider=name,
                pass_="decode",
                timing=timing,
                tokens_per_s=B * R / (timing.median_ms * 1e-3),
                weight_bytes=weight_bytes,
                reps=rep,
                **extra,
            )
        )
    eager_tps = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_eager"] = r["tokens_per_s"] / eager_tps
    print_rows(rows)
    print("->", append_rows("rollout", rows, device))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode", action="store_true", help="eager vs compiled vs HF decode")
    parser.add_argument("--rep", type=int, default=3, help="timed rollouts per provider")
    args = parser.parse_args()
    decode_main(args.rep) if args.decode else main()
