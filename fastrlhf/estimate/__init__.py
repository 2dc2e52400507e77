"""``fastrlhf estimate``: peak GPU memory of each phase of a run, predicted without a GPU.

``estimate(cfg, model)`` builds the run's models from a preset or a config.json on the
meta device, materialises them as fake tensors and measures each phase with PyTorch's
``MemTracker`` (``fastrlhf.estimate.phases``), for fused ops on and off and memory reuse
on and off, plus ATen ops per decoded token and per optimizer step (a lower bound on
kernel launches). ``fastrlhf.estimate.report`` prints it; keys are documented in the
README ("Will it fit?").

What it does not see: allocator rounding and fragmentation (reserved vs allocated), the
CUDA context, cuBLAS / NCCL workspaces, CUDA graphs and compiled code. Compare with
``torch.cuda.max_memory_allocated`` (``fastrlhf.estimate.calibrate``), not with nvidia-smi.
"""

from __future__ import annotations

import dataclasses
import time

from fastrlhf.config import RunConfig
from fastrlhf.estimate.presets import PRESETS, hf_config, model_config_dict

__all__ = ["PRESETS", "estimate", "formulas"]

GiB = 2**30


def _row(phase: str, fused: bool, reuse: bool, meas, kernels: int | None) -> dict:
    return {
        "phase": phase,
        "fused_ops": fused,
        "memory_reuse": reuse,
        "peak_bytes": meas.total_bytes,
        "peak_gib": round(meas.total_bytes / GiB, 3),
        "by_category_bytes": {k: v for k, v in meas.by_category.items() if v},
        "op_scratch_bytes": meas.extra_bytes.get("op_scratch", 0),
        "kernels": kernels,
    }


def formulas(cfg: RunConfig, models) -> dict[str, int]:
    """Bytes that follow from shapes alone (the tests check the tracker against these)."""
    out: dict[str, int] = {}
    for name in ("policy", "reference", "reward", "critic"):
        module = getattr(models, name)
        if module is not None:
            n = sum(p.numel() for p in module.parameters())
            size = next(module.parameters()).element_size()
            out[f"{name}_params"] = n
            out[f"{name}_param_bytes"] = n * size
    for name, module in (("policy", models.policy), ("critic", models.critic)):
        if module is not None and any(p.requires_grad for p in module.parameters()):
            n = sum(p.numel() for p in module.parameters() if p.requires_grad)
            size = next(module.parameters()).element_size()
            out[f"{name}_grad_bytes"] = n * size
            out[f"{name}_adamw_bytes"] = 2 * n * size  # exp_avg + exp_avg_sq, param dtype
    return out


def kv_cache_bytes(hf_cfg, batch: int, tokens: int, dtype_bytes: int, granule: int = 64) -> int:
    """2 (K, V) x layers x batch x kv heads x capacity x head dim x element size."""
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    capacity = -(-tokens // granule) * granule
    kv_heads = getattr(hf_cfg, "num_key_value_heads", None) or hf_cfg.num_attention_heads
    return 2 * hf_cfg.num_hidden_layers * batch * kv_heads * capacity * head_dim * dtype_bytes


def estimate(
    cfg: RunConfig, model: str, value_model: str | None = None, *, flash_attn: bool = False
) -> dict:
    """The estimate of ``cfg`` with the policy shaped like ``model`` (a preset name or a
    config.json) and the reward model / critic like ``value_model`` (default: ``model``).
    ``flash_attn``: the GPU has flash-attn installed (bf16 weights then use it).
    Returns the JSON document that ``fastrlhf estimate --json`` prints."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastrlhf.estimate import phases
    from fastrlhf.estimate.measure import FLASH_ATTN
    from fastrlhf.estimate.models import RL_STAGES, build_models, workload

    t0 = time.perf_counter()
    name, data = model_config_dict(model)
    vname, vdata = model_config_dict(value_model) if value_model else (name, data)
    FLASH_ATTN["installed"] = flash_attn  # read by the attention function while measuring
    w = workload(cfg)
    rows: list[dict] = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        m = build_models(cfg, hf_config(data), hf_config(vdata), fake=True)
        facts = formulas(cfg, m)
        if cfg.stage in RL_STAGES:
            for reuse in (True, False):
                meas, per_token = phases.generate(cfg, m, w, reuse=reuse)
                rows += [_row("generate", f, reuse, meas, per_token) for f in (True, False)]
            policy = m.policy
            facts["kv_cache_bytes"] = kv_cache_bytes(
                policy.config, w.rollout_seqs, w.seq_len, policy.lm_head_weight.element_size()
            )
            for fused in (True, False):
                meas = phases.score(cfg, m, w, fused=fused)
                rows += [_row("score", fused, r, meas, None) for r in (True, False)]
        for fused in (True, False):
            meas, per_step = phases.train(cfg, m, w, fused=fused)
            rows += [_row("train", fused, r, meas, per_step) for r in (True, False)]
    train = {r["fused_ops"]: r["peak_bytes"] for r in rows if r["phase"] == "train"}
    return {
        "stage": cfg.stage,
        "model": name,
        "value_model": vname if (cfg.stage in RL_STAGES or cfg.stage == "rm") else None,
        "weights_dtype": str(next(m.trained()[0].parameters()).dtype).replace("torch.", ""),
        "autocast_bf16": cfg.train.bf16,
        "flash_attn": flash_attn,
        "workload": dataclasses.asdict(w),
        "formulas_bytes": facts,
        "phases": rows,
        "train_fused_over_reference": round(train[True] / train[False], 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
