"""One whole PPO step: generate -> score -> train, fastrlhf vs the reference-ops switch.

Providers (the same ``PPOStage`` iteration, same models, prompts and seeds):

    fastrlhf    ppo.fused_ops=true, ppo.memory_reuse=true: fused lm_head log-probs
                (``linear_token_logprobs``, no [N, V] logits), packed GAE through the
                extension, fused PPO / value losses, one KV cache reset between rollouts
    reference   ppo.fused_ops=false, ppo.memory_reuse=false: materialised logits +
                log_softmax, the padded reverse GAE loop, the unfused PyTorch losses, a
                new KV cache allocated every rollout

The step: P prompts (random token ids, lengths P_len/2..P_len) -> R new tokens each
(no EOS: every response is exactly R tokens) -> old / reference log-probs, critic
values, reward-model scores -> GAE -> 1 PPO epoch of 1 mini-batch, packed into
micro-batches of ``train.micro_batch_tokens``. Models (random weights, built in memory
from a local config, nothing downloaded): policy and critic / reward model on the same
backbone shape; the reference is a frozen copy of the policy.

    CUDA: Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
          4864, vocab 151936, tied embeddings), fp32 master weights + bf16 autocast,
          P = 64 prompts of <= 128 tokens, R = 512.
    CPU:  a tiny shape so that a row lands (seconds).

Reported per provider: median / p20 / p80 step time, tokens per second of the whole
step (prompt + response tokens of the rollout / step time) and per phase, peak CUDA
memory per phase (generate, score, train), and the step's matmul FLOP rate next to the
device's measured dense matmul rate (its ceiling; decode is memory-bound, so the step
stays far below it). Rows go to bench/results/ppo_step.jsonl.

``--quick`` (the GPU script): the same 0.5B shape at P = 32, R = 256, one timed step
after the warm-up; ``--tiny``: the CPU shape anywhere (dry run). Each provider's row is
appended as soon as it is measured.

Run: ``.venv/bin/python -m bench.bench_ppo_step [--quick | --tiny]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch

from bench.harness import Timing, append_rows, matmul_tflops, print_rows, row


def _shape(device: torch.device, tiny: bool = False, quick: bool = False) -> dict:
    if quick and not tiny and device.type == "cuda":
        return dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                    prompts=32, prompt_len=128, new_tokens=256, micro_batch_tokens=8192,
                    steps=1)  # fmt: skip
    if device.type == "cuda" and not tiny:
        return dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                    prompts=64, prompt_len=128, new_tokens=512, micro_batch_tokens=8192,
                    steps=2)  # fmt: skip
    return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
                prompts=4, prompt_len=16, new_tokens=16, micro_batch_tokens=256,
                steps=2)  # fmt: skip


def _models(shape: dict, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

    from fastrlhf.models import PolicyModel, ValueModel
    from fastrlhf.models.attention import resolve_attn_impl
    from fastrlhf.trainers.loading import frozen
    from fastrlhf.trainers.rl_models import RLModels

    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")  # fmt: skip
    config = Qwen2Config(
        **{k: shape[k] for k in keys},
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        attn_implementation=resolve_attn_impl("auto"),
    )
    torch.manual_seed(0)
    policy = PolicyModel(Qwen2ForCausalLM(config).to(device))
    reference = frozen(copy.deepcopy(policy))
    reward = ValueModel(Qwen2Model(config).to(device))
    reward.reward_mean, reward.reward_std = 0.0, 1.0
    critic = ValueModel(Qwen2Model(config).to(device))
    return RLModels(policy, reference, frozen(reward), critic=critic)


def _run(provider: str, shape: dict, device: torch.device) -> dict:
    from fastrlhf.config import PPOConfig, load_config
    from fastrlhf.data.batch import PromptItem
    from fastrlhf.trainers.optim import matmul_params
    from fastrlhf.trainers.ppo import PPOStage

    fused = provider == "fastrlhf"
    cfg = load_config(None, [
        f"device={device}", f"train.micro_batch_tokens={shape['micro_batch_tokens']}",
        "train.max_steps=100", "optim.lr=1e-6",
    ])  # fmt: skip
    ppo = PPOConfig(
        kind="ppo",
        rollout_batch_size=shape["prompts"],
        max_new_tokens=shape["new_tokens"],
        fused_ops=fused,
        memory_reuse=fused,
    )
    g = torch.Generator().manual_seed(1)
    vocab, plen = shape["vocab_size"], shape["prompt_len"]
    lens = torch.randint(plen // 2, plen + 1, (shape["prompts"],), generator=g).tolist()
    prompts = [
        PromptItem(torch.randint(1, vocab, (n,), generator=g).tolist(), text="") for n in lens
    ]
    models = _models(shape, device)
    trainer = PPOStage(cfg, ppo, models=models, prompts=prompts)
    times, hosts = [], []
    for step in range(1, shape["steps"] + 2):  # the first step warms up (allocator, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics, host = trainer.iteration(step)
        loss = float(metrics["policy_loss"])  # a sync: the step is done
        if step > 1:
            times.append((time.perf_counter() - t0) * 1e3)
            hosts.append(host)
    assert loss == loss, f"{provider}: NaN loss"
    generated = shape["prompts"] * shape["new_tokens"]
    tokens = sum(lens) + generated
    q = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    # matmul FLOPs of the step (attention scores left out): decode 2*Pp per generated
    # token; scoring 2*Pp*N twice (old, reference) and 2*Pv*N twice (critic, reward);
    # training 6*(Pp + Pv)*N for one epoch
    pp, pv = matmul_params(models.policy), matmul_params(models.critic)
    flops = 2 * pp * generated + 4 * (pp + pv) * tokens + 6 * (pp + pv) * tokens
    out = dict(timing=Timing(*q), tokens_per_s=tokens / q[0] * 1e3,
               model_tflops=flops / (q[0] * 1e-3) / 1e12)  # fmt: skip
    for k in hosts[0]:
        if k.startswith(("tokens_per_s/", "memory/")):
            out[k.replace("/", "_")] = statistics.median(h[k] for h in hosts)
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="one PPO step, fastrlhf vs reference ops")
    ap.add_argument("--tiny", action="store_true", help="the CPU shape (dry run)")
    ap.add_argument("--quick", action="store_true", help="fewer prompts and tokens (GPU)")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    shape = _shape(device, a.tiny, a.quick)
    desc = (
        f"P={shape['prompts']} prompt<={shape['prompt_len']} R={shape['new_tokens']} "
        f"H={shape['hidden_size']} L={shape['num_hidden_layers']} V={shape['vocab_size']}"
    )
    ceiling = matmul_tflops(device)
    for provider in ("fastrlhf", "reference"):
        r = _run(provider, shape, device)
        dtype = "bf16-autocast" if device.type == "cuda" else "float32"
        r["matmul_tflops_ceiling"] = ceiling
        rows = [row(shape=desc, dtype=dtype, provider=provider, pass_="ppo_step", **r)]
        print_rows(rows)
        print("->", append_rows("ppo_step", rows, device))


if __name__ == "__main__":
    main()
