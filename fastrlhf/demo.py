"""``fastrlhf demo`` / ``make demo``: the whole pipeline on the embedded tiny model.

    build the tiny Llama  ->  SFT on noisy demonstrations  ->  reward model on preference
    pairs (initialised from the SFT model)  ->  PPO from the SFT model, rewarded by the
    reward model only;  DPO and GRPO each from the same SFT model (``demo.stages``)

then every policy (the random initial one included) answers held-out arithmetic prompts
with greedy decoding and the task's gold checker scores the answers. The table printed
at the end holds only numbers computed in this run: gold accuracy per policy, and the
reward model's held-out accuracy / ROC AUC. Each stage writes its own run directory
(config, metrics.jsonl, plots, checkpoints, final model) under ``demo.run_dir``, and
``gold.png`` / ``summary.json`` summarise the run.

Adding a stage (PPO, GRPO): write ``_run_<stage>(ctx) -> StageReport`` and register it in
``STAGE_RUNNERS``; ``ctx.models`` holds the final model directory of every finished
stage (e.g. ``ctx.models["sft"]``, ``ctx.models["rm"]``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastrlhf.config import DemoSettings, RunConfig, load_demo_config


@dataclass
class StageReport:
    stage: str
    gold_accuracy: float | None  # None for stages that do not produce a policy
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""  # e.g. what rewarded an RL stage


@dataclass
class DemoContext:
    settings: DemoSettings
    configs: dict[str, RunConfig]
    eval_prompts: list[dict]
    gold_score: Callable[[str, str], float]
    models: dict[str, str] = field(default_factory=dict)  # stage -> final model dir


def _with_model(cfg: RunConfig, path: str, **sections) -> RunConfig:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=path))
    for name, values in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)})
    return cfg


def policy_gold_accuracy(ctx: DemoContext, model_dir: str) -> float:
    """Gold accuracy of the policy at ``model_dir`` on the held-out prompts (greedy)."""
    from fastrlhf.trainers.gold import gold_accuracy
    from fastrlhf.trainers.loading import load_policy_for
    from fastrlhf.trainers.runtime import resolve_device

    cfg = ctx.configs["sft"]
    policy = load_policy_for(cfg, model_dir, resolve_device(cfg.device), trainable=False)
    s = ctx.settings
    return gold_accuracy(policy, ctx.eval_prompts, s.max_new_tokens, ctx.gold_score, cfg.data)


def _train(cfg: RunConfig):
    from fastrlhf.trainers import run_stage

    return run_stage(cfg)


def _run_sft(ctx: DemoContext) -> StageReport:
    result = _train(_with_model(ctx.configs["sft"], ctx.models["init"]))
    ctx.models["sft"] = str(result.final_dir)
    return StageReport(
        "sft",
        policy_gold_accuracy(ctx, ctx.models["sft"]),
        {"eval_loss": result.eval_metrics.get("loss", float("nan"))},
    )


def _run_rm(ctx: DemoContext) -> StageReport:
    result = _train(_with_model(ctx.configs["rm"], ctx.models["sft"]))
    ctx.models["rm"] = str(result.final_dir)
    keys = ("accuracy", "auc", "margin", "ece")
    return StageReport("rm", None, {f"rm_{k}": result.eval_metrics[k] for k in keys})


def _run_dpo(ctx: DemoContext) -> StageReport:
    cfg = _with_model(ctx.configs["dpo"], ctx.models["sft"])
    result = _train(cfg)
    ctx.models["dpo"] = str(result.final_dir)
    m = result.eval_metrics
    return StageReport(
        "dpo",
        policy_gold_accuracy(ctx, ctx.models["dpo"]),
        {"reward_accuracy": m.get("reward_accuracy", float("nan"))},
    )


def _run_rl(ctx: DemoContext, stage: str) -> StageReport:
    """PPO / GRPO from the SFT model; with no reward function set, the demo's reward model
    scores the responses (the gold checker is never seen in training)."""
    cfg = ctx.configs[stage]
    ppo = cfg.ppo
    if ppo.reward_model is None and ppo.reward_fn is None:
        ppo = dataclasses.replace(ppo, reward_model=ctx.models["rm"])
    cfg = dataclasses.replace(_with_model(cfg, ctx.models["sft"]), ppo=ppo)
    result = _train(cfg)
    ctx.models[stage] = str(result.final_dir)
    return StageReport(
        stage,
        policy_gold_accuracy(ctx, ctx.models[stage]),
        {"reward": result.eval_metrics.get("reward", float("nan"))},
        note=f"rewarded by {'the reward model' if ppo.reward_fn is None else ppo.reward_fn}",
    )


# stage name -> runner; runs in the order of demo.stages (ppo / grpo slot in here)
STAGE_RUNNERS: dict[str, Callable[[DemoContext], StageReport]] = {
    "sft": _run_sft,
    "rm": _run_rm,
    "dpo": _run_dpo,
    "ppo": lambda ctx: _run_rl(ctx, "ppo"),
    "grpo": lambda ctx: _run_rl(ctx, "grpo"),
}
# what each stage needs to have run before it
REQUIRES = {"sft": (), "rm": ("sft",), "dpo": ("sft",), "ppo": ("sft", "rm"), "grpo": ("sft", "rm")}


def _held_out_prompts(settings: DemoSettings, configs: dict[str, RunConfig]) -> list[dict]:
    """RL-style prompts of the embedded task that no training stage has seen."""
    from fastrlhf.trainers.records import embedded_task, stage_records

    seen = set()
    for stage in settings.stages:
        kind = {"sft": "sft", "ppo": "prompts", "grpo": "prompts"}.get(stage, "pairs")
        train, _ = stage_records(configs[stage].data, kind)
        seen |= {r["prompt"] for r in train}
    task = embedded_task(configs["sft"].data, settings.eval_seed)
    pool = task.rl_prompts(32 * settings.eval_prompts + 1024)
    held_out = [r for r in pool if r["prompt"] not in seen]
    # distinct prompts, so the score is not dominated by a few repeated problems
    unique = list({r["prompt"]: r for r in held_out}.values())
    return unique[: settings.eval_prompts]


def format_table(reports: list[StageReport]) -> str:
    lines = [f"{'stage':<8} {'gold accuracy':>14}  other (held-out)", "-" * 60]
    for r in reports:
        gold = f"{r.gold_accuracy:.3f}" if r.gold_accuracy is not None else "-"
        other = "  ".join(f"{k}={v:.3f}" for k, v in r.metrics.items())
        note = f"  [{r.note}]" if r.note else ""
        lines.append(f"{r.stage:<8} {gold:>14}  {other}   ({r.seconds:.0f}s){note}")
    return "\n".join(lines)


def _plot_gold(reports: list[StageReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in reports if r.gold_accuracy is not None]
    fig, ax = plt.subplots(figsize=(4 + len(rows), 3))
    ax.bar([r.stage for r in rows], [r.gold_accuracy for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("gold accuracy (held-out, greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_demo(config_path: str | Path, overrides: list[str] | None = None) -> list[StageReport]:
    """Run the demo pipeline of ``config_path``; print and return the per-stage report."""
    from fastrlhf.trainers.loading import model_path
    from fastrlhf.trainers.records import embedded_task

    settings, configs = load_demo_config(config_path, overrides)
    for stage in settings.stages:
        missing = [r for r in REQUIRES[stage] if r not in settings.stages]
        if missing:
            raise ValueError(f"demo.stages: {stage!r} needs {missing} to run before it")
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = embedded_task(configs["sft"].data)
    ctx = DemoContext(settings, configs, _held_out_prompts(settings, configs), task.gold_score)
    t0 = time.perf_counter()
    ctx.models["init"] = model_path(configs["sft"].model, run_dir)
    reports = [StageReport("init", policy_gold_accuracy(ctx, ctx.models["init"]))]
    reports[0].seconds = time.perf_counter() - t0
    for stage in settings.stages:
        t0 = time.perf_counter()
        print(f"== demo stage {stage}")
        report = STAGE_RUNNERS[stage](ctx)
        report.seconds = time.perf_counter() - t0
        reports.append(report)
    print(f"\nheld-out prompts: {len(ctx.eval_prompts)} (greedy, gold checker)")
    print(format_table(reports))
    _plot_gold(reports, run_dir / "gold.png")
    summary = {
        "stages": [dataclasses.asdict(r) for r in reports],
        "models": ctx.models,
        "eval_prompts": len(ctx.eval_prompts),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nrun directory: {run_dir} (per-stage plots under <stage>/plots, gold.png)")
    return reports
