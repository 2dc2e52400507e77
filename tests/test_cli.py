"""The command line: errors name the key and file:line, exit codes, ``python -m fastrlhf``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrlhf.cli import default_demo_config, main

REPO = Path(__file__).resolve().parent.parent


def test_unknown_key_in_file_exits_2_naming_key_and_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("stage: sft\ntrain:\n  max_steps: 3\n  batchsize: 4\n")
    assert main(["sft", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.batchsize'" in err and f"{cfg}, line 4" in err
    assert "train.batch_size" in err  # suggestion


def test_bad_override_exits_2(capsys):
    assert main(["rm", "optim.lr=fast"]) == 2
    assert "optim.lr: expected a number, got 'fast'" in capsys.readouterr().err


def test_config_for_another_stage_is_refused(capsys):
    assert main(["dpo", "--config", str(REPO / "examples" / "sft.yaml")]) == 2
    assert "is a 'sft' config, not 'dpo'" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["sft", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_config_errors(capsys):
    assert main(["demo", "sft.optim.lr=-1"]) == 2
    assert "demo stage 'sft': optim.lr=-1.0 must be > 0" in capsys.readouterr().err


def test_demo_config_is_installed_with_the_package():
    # `fastrlhf demo` without --config reads the packaged copy of examples/demo.yaml; in this
    # editable install that is the checkout's file itself
    path = default_demo_config()
    assert path.is_file(), path
    assert path.resolve() == (REPO / "examples" / "demo.yaml").resolve()


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["train"])
    assert e.value.code == 2


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "fastrlhf", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0
    for command in ("sft", "rm", "dpo", "demo"):
        assert command in out.stdout


def test_non_finite_loss_exits_1_naming_the_step(tmp_path, capsys):
    args = [
        "sft", f"run_dir={tmp_path}", "optim.lr=1e30", "optim.max_grad_norm=0",
        "train.max_steps=4", "train.batch_size=4", "data.num_train=8", "data.num_eval=0",
        "data.max_length=40", "data.max_prompt_length=20", "train.progress_bar=false",
        "train.cpu_threads=1", "logging.plots=false",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert main(args) == 1
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "non-finite" in err and "at step" in err
    assert not (tmp_path / "final").exists()  # nothing exported after the failure
