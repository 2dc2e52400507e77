"""``fastrlhf feedback demo`` end to end at a small size: SFT policy -> samples -> simulated
annotators voting over HTTP -> agreement vs. theory -> export -> reward model."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("uvicorn")

from fastrlhf.cli import main as cli_main  # noqa: E402
from fastrlhf.feedback.store import active_votes, connect  # noqa: E402


@pytest.mark.slow
def test_feedback_demo_small(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    args = ["feedback", "demo", "--run-dir", str(run_dir), "--sft-steps", "80",
            "--items", "60", "--held-out", "16", "--gold", "6", "--rm-steps", "4"]  # fmt: skip
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy vs. the truth" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    votes = active_votes(connect(run_dir / "feedback.db"))
    # every vote came through the web API; with overlap 1.0 all three label every item
    assert len(votes) == 3 * 60 and all(v.origin == "web" for v in votes)
    assert summary["votes"] == 180
    for c in summary["agreement_vs_theory"]:
        assert c["n"] == 60
        assert abs(c["measured"] - c["theory"]) < 5 * c["se"], c
    rm = summary["rm_held_out"]
    assert 0.0 <= rm["accuracy"] <= 1.0 and math.isfinite(rm["auc"])
    rows = (run_dir / "prefs" / "train.jsonl").read_text().splitlines()
    assert len(rows) == summary["export"]["pairs"] > 0
    assert (run_dir / "kappa.png").exists()
