"""Every user error the CLI can meet: ONE line on stderr naming the file or key, exit
status 2, no traceback (``--debug`` / FASTRLHF_DEBUG=1 add it); internal errors keep
their traceback. One table row per error (issue 15), run in-process on the tiny model."""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fastrlhf.cli import main
from fastrlhf.integrity import load_state_json

SMALL = [
    "data.max_length=40",
    "data.max_prompt_length=20",
    "data.num_train=16",
    "data.num_eval=4",
    "train.batch_size=4",
    "train.micro_batch_tokens=96",
    "train.max_steps=1",
    "train.eval_every=0",
    "train.progress_bar=false",
    "train.cpu_threads=1",
    "logging.plots=false",
    "checkpoint.save_every=1",
    "checkpoint.keep_last=1",
    "checkpoint.save_final=false",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from fastrlhf.data.embedded import embedded_model

    return embedded_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, model_dir) -> Path:
    """A one-step SFT run with its one checkpoint (keep_last=1: nothing to fall back to)."""
    run = tmp_path_factory.mktemp("done") / "run"
    n = torch.get_num_threads()
    assert main(["sft", f"run_dir={run}", f"model.name_or_path={model_dir}", *SMALL]) == 0
    torch.set_num_threads(n)
    assert (run / "checkpoints" / "step_00000001" / "MANIFEST.json").is_file()
    return run


def _sft(run: Path, model: str, *extra: str) -> list[str]:
    flags = [e for e in extra if e.startswith("--")]  # before the overrides (argparse)
    keys = [e for e in extra if not e.startswith("--")]
    return ["sft", *flags, f"run_dir={run}", f"model.name_or_path={model}", *SMALL, *keys]


def _copy_run(finished: Path, tmp: Path) -> tuple[Path, Path]:
    run = tmp / "run"
    shutil.copytree(finished, run)
    return run, run / "checkpoints" / "step_00000001"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _to_legacy(ckpt: Path) -> None:
    """The checkpoint format before manifests (torch.save'd state files)."""
    torch.save(load_state_json(ckpt / "trainer_state.json"), ckpt / "trainer_state.pt")
    torch.save(load_state_json(ckpt / "rng/rank_00000.json"), ckpt / "rng/rank_00000.pt")
    for rel in ("trainer_state.json", "rng/rank_00000.json", "MANIFEST.json"):
        (ckpt / rel).unlink()


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


_PAIRS = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(8)]


@dataclass
class Case:
    name: str
    # (tmp_path, model_dir, finished_run, monkeypatch) -> (argv, text the line must hold)
    setup: Callable[..., tuple[list[str], str]]


def _missing_model(tmp, model, done, mp):
    return _sft(tmp / "r", str(tmp / "no" / "such" / "model")), "no/such/model: no such model"


def _offline_hub_id(tmp, model, done, mp):
    import huggingface_hub.constants

    mp.setenv("HF_HUB_OFFLINE", "1")
    # the hub reads the variable once, at import, which an earlier test may have done
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return _sft(tmp / "r", "nobody-xyz/no-such-model"), "'nobody-xyz/no-such-model'"


def _broken_config_json(tmp, model, done, mp):
    bad = tmp / "model"
    shutil.copytree(model, bad)
    (bad / "config.json").write_text("{ not json")
    return _sft(tmp / "r", str(bad)), f"model.name_or_path={bad}"


def _empty_data_file(tmp, model, done, mp):
    (tmp / "empty.jsonl").write_text("")
    return _sft(tmp / "r", model, f"data.source={tmp / 'empty.jsonl'}"), "empty.jsonl: no records"


def _no_valid_row(tmp, model, done, mp):
    path = _jsonl(tmp / "bad.jsonl", ["{oops", {"prompt": "1+1="}, "[1]", {"x": 1}, "nope"])
    return _sft(tmp / "r", model, f"data.source={path}"), "no usable sft record"


def _missing_data_file(tmp, model, done, mp):
    path = tmp / "nothere.jsonl"
    return _sft(tmp / "r", model, f"data.source={path}"), "nothere.jsonl: no such file"


def _csv_data_file(tmp, model, done, mp):
    (tmp / "d.csv").write_text("prompt,response\n1+1=,2\n")
    return _sft(tmp / "r", model, f"data.source={tmp / 'd.csv'}"), "d.csv: unsupported file type"


def _on_malformed_error(stage):
    def setup(tmp, model, done, mp):
        path = _jsonl(tmp / "p.jsonl", [*_PAIRS[:3], {"prompt": "q", "chosen": "a"}, *_PAIRS[3:]])
        argv = [stage, f"run_dir={tmp / 'r'}", f"model.name_or_path={model}", *SMALL]
        argv += [f"data.source={path}", "data.on_malformed=error", "data.num_eval=2"]
        return argv, "p.jsonl:4"

    return setup


def _truncated_trainer_state(tmp, model, done, mp):
    run, ckpt = _copy_run(done, tmp)
    _truncate(ckpt / "trainer_state.json")
    return _sft(run, model, "--resume", "train.max_steps=2"), "trainer_state.json: size"


def _truncated_legacy_trainer_state(tmp, model, done, mp):
    run, ckpt = _copy_run(done, tmp)
    _to_legacy(ckpt)
    _truncate(ckpt / "trainer_state.pt")
    return _sft(run, model, "--resume", "train.max_steps=2"), "trainer_state.pt: unreadable"


def _truncated_rng(tmp, model, done, mp):
    run, ckpt = _copy_run(done, tmp)
    _truncate(ckpt / "rng" / "rank_00000.json")
    return _sft(run, model, "--resume", "train.max_steps=2"), "rng/rank_00000.json: size"


def _truncated_legacy_rng(tmp, model, done, mp):
    run, ckpt = _copy_run(done, tmp)
    _to_legacy(ckpt)
    _truncate(ckpt / "rng" / "rank_00000.pt")
    return _sft(run, model, "--resume", "train.max_steps=2"), "rank_00000.pt: unreadable"


def _garbage_metadata(tmp, model, done, mp):
    run, ckpt = _copy_run(done, tmp)
    (ckpt / "dcp" / ".metadata").write_bytes(b"\x00garbage" * 10)
    return _sft(run, model, "--resume", "train.max_steps=2"), "dcp/.metadata: size"


def _garbage_legacy_metadata(tmp, model, done, mp):
    run, ckpt = _copy_run(done, tmp)
    _to_legacy(ckpt)
    (ckpt / "dcp" / ".metadata").write_bytes(b"\x80\x04garbage")
    return _sft(run, model, "--resume", "train.max_steps=2"), "dcp/.metadata: not DCP metadata"


def _missing_trainer_state(tmp, model, done, mp):
    run, ckpt = _copy_run(done, tmp)
    (ckpt / "trainer_state.json").unlink()
    return _sft(run, model, "--resume", "train.max_steps=2"), "trainer_state.json: missing"


def _resume_other_config(tmp, model, done, mp):
    run, _ = _copy_run(done, tmp)
    return _sft(run, model, "--resume", "train.max_steps=2", "model.lora_rank=4"), "cannot load"


def _run_dir_not_empty(tmp, model, done, mp):
    run, _ = _copy_run(done, tmp)
    return _sft(run, model), "--overwrite"


def _resume_and_overwrite(tmp, model, done, mp):
    return _sft(tmp / "r", model, "--resume", "--overwrite"), "--resume and --overwrite"


def _permission_denied(tmp, model, done, mp):
    def denied(cfg, path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    mp.setattr("fastrlhf.trainers.run_dir.save_config", denied)
    return _sft(tmp / "r", model), "permission denied: " + str(tmp / "r" / "config.yaml")


def _disk_full_on_save(tmp, model, done, mp):
    import fastrlhf.checkpoint as ck

    real = ck.save_state_json

    def full(state, path):
        if Path(path).name == "trainer_state.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(state, path)

    mp.setattr(ck, "save_state_json", full)
    return _sft(tmp / "r", model), "no space left on device"


def _bad_config_key(tmp, model, done, mp):
    return _sft(tmp / "r", model, "train.max_stepz=3"), "train.max_stepz"


CASES = [
    Case("missing local model directory", _missing_model),
    Case("offline hub id", _offline_hub_id),
    Case("broken config.json", _broken_config_json),
    Case("empty data file", _empty_data_file),
    Case("file with no valid row", _no_valid_row),
    Case("missing data file", _missing_data_file),
    Case("unsupported extension .csv", _csv_data_file),
    Case("data.on_malformed=error in rm", _on_malformed_error("rm")),
    Case("data.on_malformed=error in dpo", _on_malformed_error("dpo")),
    Case("truncated trainer_state", _truncated_trainer_state),
    Case("truncated legacy trainer_state.pt", _truncated_legacy_trainer_state),
    Case("truncated RNG file", _truncated_rng),
    Case("truncated legacy RNG file", _truncated_legacy_rng),
    Case("garbage in .metadata", _garbage_metadata),
    Case("garbage in legacy .metadata", _garbage_legacy_metadata),
    Case("missing trainer_state", _missing_trainer_state),
    Case("--resume with another model config", _resume_other_config),
    Case("fresh run in a non-empty run dir", _run_dir_not_empty),
    Case("--resume with --overwrite", _resume_and_overwrite),
    Case("permission denied", _permission_denied),
    Case("disk full on save", _disk_full_on_save),
    Case("config key", _bad_config_key),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_user_error_is_one_line_exit_2(
    case, tmp_path, model_dir, finished_run, monkeypatch, capsys
):
    argv, expected = case.setup(tmp_path, model_dir, finished_run, monkeypatch)
    capsys.readouterr()
    n = torch.get_num_threads()
    code = main(argv)
    torch.set_num_threads(n)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("fastrlhf: ") and expected in lines[0], lines[0]
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, model_dir, monkeypatch, capsys):
    argv = _sft(tmp_path / "r", model_dir, f"data.source={tmp_path / 'nothere.jsonl'}")
    assert main([argv[0], "--debug", *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("fastrlhf: error:")
    monkeypatch.setenv("FASTRLHF_DEBUG", "1")
    assert main(argv) == 2
    assert "Traceback" in capsys.readouterr().err


def test_internal_errors_keep_their_traceback(tmp_path, model_dir, monkeypatch):
    def bug(*a, **k):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr("fastrlhf.trainers.run_dir.save_config", bug)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(_sft(tmp_path / "r", model_dir))


def test_overwrite_starts_over_and_resume_continues(tmp_path, model_dir, finished_run, capsys):
    run, ckpt = _copy_run(finished_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    before = (ckpt / "MANIFEST.json").read_text()
    assert main(_sft(run, model_dir)) == 2  # refused: nothing touched
    assert (ckpt / "MANIFEST.json").read_text() == before
    assert main(_sft(run, model_dir, "--resume", "train.max_steps=2")) == 0
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    assert main(_sft(run, model_dir, "--overwrite")) == 0
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
    assert (run / "notes.txt").read_text() == "mine"  # not ours: left alone
    assert "--overwrite: removed checkpoints" in capsys.readouterr().err
