"""``fastrlhf estimate --config F [--model M] [--value-model M] [--json] [key=value ...]``.

Prints one table per run: rows are phases, columns the four combinations of
``ppo.fused_ops`` and ``ppo.memory_reuse`` (GiB = 2^30 bytes), then what the train
phase's peak is made of and the ATen op counts. ``--json`` prints the document of
``fastrlhf.estimate.estimate`` instead (keys: README, "Will it fit?").
"""

from __future__ import annotations

import argparse
import json

GiB = 2**30
_COMBOS = ((True, True), (True, False), (False, True), (False, False))


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``estimate`` subcommand on ``fastrlhf``'s subparsers."""
    p = sub.add_parser("estimate", help="predict peak GPU memory per phase (no GPU needed)")
    p.add_argument("--config", "-c", help="YAML file (see examples/)")
    p.add_argument(
        "--model",
        "-m",
        help="preset (Qwen2.5-0.5B, Qwen2.5-1.5B, Qwen2.5-7B, Llama-3.1-8B) or a config.json "
        "/ model directory; default: model.name_or_path",
    )
    p.add_argument("--value-model", help="reward model / critic shape (default: --model)")
    p.add_argument(
        "--flash-attn", action="store_true", help="the GPU has flash-attn (the 'flash' extra)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p


def run(args) -> int:
    from fastrlhf.config import load_config
    from fastrlhf.estimate import estimate

    cfg = load_config(args.config, args.overrides)
    model = args.model or cfg.model.name_or_path
    try:
        doc = estimate(cfg, model, args.value_model, flash_attn=args.flash_attn)
    except ValueError as e:
        from fastrlhf.config import ConfigError

        raise ConfigError(f"estimate: {e}") from e
    print(json.dumps(doc, indent=1) if args.json else table(doc))
    return 0


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f}"


def table(doc: dict) -> str:
    rows = doc["phases"]
    w = doc["workload"]
    lines = [
        f"fastrlhf estimate: stage {doc['stage']}, model {doc['model']}"
        + (f", reward/critic {doc['value_model']}" if doc.get("value_model") else "")
        + f", weights {doc['weights_dtype']}, bf16 autocast {doc['autocast_bf16']}",
        f"  sequences of {w['seq_len']} tokens ({w['loss_len']} through the lm_head); "
        f"micro-batch {w['micro_seqs']} x {w['micro_batches']} per optimizer step"
        + (
            f"; rollout {w['rollout_seqs']}, scoring chunk {w['score_seqs']}"
            if w["rollout_seqs"]
            else ""
        ),
        "",
        "peak GiB          fused+reuse  fused+fresh    ref+reuse    ref+fresh",
    ]
    for phase in dict.fromkeys(r["phase"] for r in rows):
        cells = []
        for fused, reuse in _COMBOS:
            r = next(
                r
                for r in rows
                if (r["phase"], r["fused_ops"], r["memory_reuse"]) == (phase, fused, reuse)
            )
            cells.append(f"{_gib(r['peak_bytes']):>12}")
        lines.append(f"{phase:<17}" + " ".join(cells))
    lines.append(f"train fused / reference: {doc['train_fused_over_reference']:.3f}")
    lines.append("")
    lines.append("at the train peak (GiB)  " + "  ".join(f"{c[:11]:>11}" for c in _CATS))
    for fused in (True, False):
        r = next(r for r in rows if r["phase"] == "train" and r["fused_ops"] == fused)
        cats = r["by_category_bytes"]
        values = [cats.get(c, 0) for c in _CATS[:-1]] + [r["op_scratch_bytes"]]
        lines.append(
            f"  {'fused' if fused else 'reference':<22}"
            + "  ".join(f"{_gib(v):>11}" for v in values)
        )
    per_token = next((r["kernels"] for r in rows if r["phase"] == "generate"), None)
    steps = {r["fused_ops"]: r["kernels"] for r in rows if r["phase"] == "train"}
    lines.append("")
    if per_token is not None:
        lines.append(f"ATen kernels per decoded token: {per_token}")
    lines.append(f"ATen kernels per optimizer step: fused {steps[True]}, reference {steps[False]}")
    lines.append(
        "(allocated bytes as torch.cuda.max_memory_allocated counts them; add the CUDA "
        "context, workspaces and allocator fragmentation for nvidia-smi)"
    )
    return "\n".join(lines)


_CATS = (
    "parameters",
    "gradients",
    "optimizer",
    "activations",
    "temporaries",
    "other",
    "op_scratch",
)
