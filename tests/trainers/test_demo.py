"""The demo pipeline end to end at toy size: every stage runs, chains its models, and the
report holds numbers computed in the run."""

from __future__ import annotations

import json
from pathlib import Path

from fastrlhf.demo import run_demo

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"


def test_demo_pipeline_runs_and_reports(tmp_path, capsys):
    overrides = [
        f"demo.run_dir={tmp_path / 'demo'}",
        "demo.eval_prompts=8",
        "demo.max_new_tokens=4",
        "common.train.progress_bar=false",
        "common.train.cpu_threads=1",
        "common.logging.plots=true",
    ]
    for stage in ("sft", "rm", "ppo", "dpo", "grpo"):
        overrides += [
            f"{stage}.train.max_steps=2",
            f"{stage}.train.batch_size=4",
            f"{stage}.data.num_train=16",
            f"{stage}.data.num_eval=8",
            f"{stage}.train.eval_every=0",
        ]
    for stage in ("ppo", "grpo"):
        overrides += [f"{stage}.ppo.rollout_batch_size=4", f"{stage}.ppo.num_mini_batches=1"]
    reports = run_demo(DEMO, overrides)
    assert [r.stage for r in reports] == ["init", "sft", "rm", "ppo", "dpo", "grpo"]
    for r in reports:
        if r.stage == "rm":
            assert r.gold_accuracy is None and 0 <= r.metrics["rm_auc"] <= 1
        else:
            assert 0 <= r.gold_accuracy <= 1
    out = capsys.readouterr().out
    assert "gold accuracy" in out and "rm_accuracy=" in out
    run_dir = tmp_path / "demo"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_prompts"] == 8
    # RM and DPO start from the SFT model
    assert summary["models"]["sft"] == str(run_dir / "sft" / "final")
    dpo_cfg = (run_dir / "dpo" / "config.yaml").read_text()
    assert f"name_or_path: {run_dir / 'sft' / 'final'}" in dpo_cfg
    assert (run_dir / "gold.png").is_file()
    for stage in ("sft", "rm", "dpo"):
        assert (run_dir / stage / "plots" / "train.png").is_file()
