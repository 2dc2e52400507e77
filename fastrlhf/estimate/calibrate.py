"""Estimate vs ``torch.cuda.max_memory_allocated`` on a GPU, per phase of a real PPO step.

    python -m fastrlhf.estimate.calibrate [--model Qwen2.5-0.5B] [--out FILE] [key=value ...]

Runs ``PPOStage.iteration`` (generate -> score -> train, the trainer's own code) with
randomly initialised models of the given shape (nothing is downloaded) for fused ops on
and off, reads each phase's peak from the trainer (``memory/<phase>_peak_gb``: the CUDA
peak, reset at phase entry) at the second iteration (optimizer states then exist, as the
estimate assumes), and prints it next to ``fastrlhf.estimate.estimate`` of the same
config. Every prompt is ``data.max_prompt_length`` tokens and no EOS stops a response, so
the shapes are the estimate's worst case. Rows are appended to ``--out`` (JSONL) as soon
as each is measured. Without CUDA it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

GiB = 2**30
# a small default workload: 0.5B models, 64 prompts of 128 tokens, 128 new tokens
DEFAULTS = [
    "stage=ppo",
    "ppo.reward_model=calibrate",
    "ppo.rollout_batch_size=64",
    "ppo.max_new_tokens=128",
    "ppo.num_mini_batches=2",
    "data.max_prompt_length=128",
    "data.max_length=512",
    "train.micro_batch_tokens=4096",
    "train.max_steps=10",
]


def _models(cfg, hf_cfg, device):
    from transformers import AutoModel, AutoModelForCausalLM

    from fastrlhf.models import PolicyModel, ValueModel
    from fastrlhf.models.attention import resolve_attn_impl
    from fastrlhf.trainers.loading import frozen
    from fastrlhf.trainers.rl_models import RLModels

    impl = resolve_attn_impl(cfg.model.attn_impl)
    dtype = {"auto": "float32"}.get(cfg.model.dtype, cfg.model.dtype)

    def lm():
        m = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation=impl)
        m.config.use_cache = False
        return m.to(device)

    def backbone():
        m = AutoModel.from_config(hf_cfg, dtype=dtype, attn_implementation=impl)
        m.config.use_cache = False
        return m.to(device)

    ppo = cfg.ppo.for_stage(cfg.stage)  # kind may be null until resolved
    policy = PolicyModel(lm())
    reference = frozen(copy.deepcopy(policy)) if ppo.uses_reference else None
    reward = frozen(ValueModel(backbone()))
    critic = ValueModel(backbone()) if ppo.kind == "ppo" else None
    return RLModels(policy, reference, reward, critic=critic)


def measure(cfg, hf_cfg, device) -> dict[str, float]:
    """Per-phase CUDA peaks (GiB) of the second iteration of a PPO run of ``cfg``."""
    import torch

    from fastrlhf.data.batch import PromptItem
    from fastrlhf.trainers.ppo import PPOStage

    g = torch.Generator().manual_seed(0)
    vocab, plen = int(hf_cfg.vocab_size), cfg.data.max_prompt_length
    prompts = [
        PromptItem(torch.randint(1, vocab, (plen,), generator=g).tolist(), text="")
        for _ in range(cfg.ppo.rollout_batch_size)
    ]
    trainer = PPOStage(cfg, cfg.ppo, models=_models(cfg, hf_cfg, device), prompts=prompts)
    host = {}
    for step in (1, 2):
        _, host = trainer.iteration(step)
    trainer.memory.finish()
    # the trainer reports the CUDA peaks only on CUDA: None elsewhere (smoke tests)
    return {p: host.get(f"memory/{p}_peak_gb") for p in ("generate", "score", "train")}


def main(argv: list[str] | None = None) -> int:
    import torch

    from fastrlhf.config import load_config
    from fastrlhf.estimate import estimate
    from fastrlhf.estimate.presets import hf_config, model_config_dict

    p = argparse.ArgumentParser(prog="python -m fastrlhf.estimate.calibrate")
    p.add_argument("--model", default="Qwen2.5-0.5B")
    p.add_argument("--out", help="append one JSON row per (phase, fused) here")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("calibrate: needs a CUDA device (the estimate itself does not)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    name, data = model_config_dict(args.model)
    for fused in (True, False):
        over = [*DEFAULTS, "device=cuda", *args.overrides, f"ppo.fused_ops={fused}".lower()]
        cfg = load_config(None, over)
        t0 = time.perf_counter()
        doc = estimate(cfg, args.model)
        predicted = {
            r["phase"]: r["peak_bytes"] / GiB
            for r in doc["phases"]
            if r["fused_ops"] == fused and r["memory_reuse"] == cfg.ppo.memory_reuse
        }
        torch.cuda.empty_cache()
        measured = measure(cfg, hf_config(data), device)
        for phase, gib in measured.items():
            row = {
                "bench": "estimate_calibration",
                "model": name,
                "phase": phase,
                "fused_ops": fused,
                "estimate_gib": round(predicted[phase], 3),
                "max_memory_allocated_gib": round(gib, 3),
                "ratio": round(predicted[phase] / gib, 4) if gib else None,
                "gpu": torch.cuda.get_device_name(device),
                "seconds": round(time.perf_counter() - t0, 1),
                "overrides": over,
            }
            print(
                f"{phase:<9} fused={fused!s:<5} estimate {row['estimate_gib']:8.3f} GiB   "
                f"max_memory_allocated {row['max_memory_allocated_gib']:8.3f} GiB   "
                f"ratio {row['ratio']}"
            )
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
