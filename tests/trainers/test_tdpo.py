"""TDPO kinds of the DPO stage: the sequential KL at init, and a 2-step CLI run."""

from __future__ import annotations

import math

import pytest

from fastrlhf.cli import main
from fastrlhf.trainers.dpo import DPOStage
from fastrlhf.trainers.supervised import accumulate_gradients
from tests.trainers.conftest import SMALL


@pytest.mark.parametrize("kind", ["tdpo1", "tdpo2"])
def test_tdpo_at_init_has_zero_kl_and_log2_loss(small_config, kind):
    stage = DPOStage(small_config("dpo", f"dpo.kind={kind}", "dpo.reference=precompute"))
    # TDPO always runs the reference online (it needs its hidden states)
    assert stage.ref is not None and not stage.ref_tables
    loss, sums = accumulate_gradients(stage, [stage.micro_batch([0, 3, 5])])
    # policy == reference: every token's KL is 0, so the loss is log 2
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert abs(sums["seq_kl_chosen"].item()) < 1e-4 and abs(sums["seq_kl_rejected"].item()) < 1e-4


def test_cli_two_steps_of_tdpo2(tmp_path, tiny_model_dir, capsys):
    run_dir = tmp_path / "tdpo2"
    overrides = [
        f"run_dir={run_dir}", f"model.name_or_path={tiny_model_dir}", *SMALL,
        "dpo.kind=tdpo2", "dpo.alpha=0.5", "train.max_steps=2", "train.eval_every=2",
        "optim.lr=1e-2",
    ]  # fmt: skip
    assert main(["dpo", *overrides]) == 0
    logged = list(run_dir.rglob("*.jsonl"))
    text = "".join(p.read_text() for p in logged)
    assert "seq_kl_chosen" in text and "seq_kl_rejected" in text
