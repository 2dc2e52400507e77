"""Checkpoints (fastrlhf.checkpoint): a bit-exact round trip of weights, frozen parameters,
buffers and TWO optimizers through dcp/; the HF export in model/; trainer state and RNG;
re-seeding when the world size changed; pruning; atomic publication under failures;
clear errors on bad input; a payload planted in any file never runs (manifest, then
loaders that never unpickle arbitrary objects); a corrupt latest checkpoint falls back.

Single process throughout (``DistContext()``, no process group: DCP runs with no_dist);
tests/distributed covers several processes. Every save is small (a toy of ~100 numbers).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastrlhf.checkpoint import (
    atomic_write_dir,
    atomic_write_dir_all_ranks,
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    load_trainer_state,
    resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fastrlhf.distributed import DistContext
from fastrlhf.distributed.tensor_file import read_saved, read_saved_plain, read_saved_tensor
from fastrlhf.errors import CheckpointError
from fastrlhf.integrity import load_state_json, save_state_json, write_manifest

# ---------------------------------------------------------------------------------------
# a toy "policy + critic" trained by two optimizers, as PPO's checkpointed module


class Toy(torch.nn.Module):
    """Policy (two Linear layers) and critic (one), a frozen parameter that no optimizer
    holds, and a buffer: everything a checkpoint must bring back."""

    def __init__(self, hidden: int = 7, extra: bool = False):
        super().__init__()
        self.policy = torch.nn.Sequential(
            torch.nn.Linear(5, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3)
        )
        self.critic = torch.nn.Linear(3, 1)
        self.frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("scale", torch.rand(3) + 0.5)
        if extra:  # a parameter no checkpoint of the plain Toy has
            self.extra = torch.nn.Parameter(torch.randn(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 5] -> [B, 1]
        return self.critic(self.policy(x) * self.scale + self.frozen)


def _optimizers(m: Toy) -> list[torch.optim.Optimizer]:
    # different hyperparameters per optimizer: a mix-up on load would show in the next step
    return [
        torch.optim.AdamW(m.policy.parameters(), lr=1e-2, weight_decay=0.1),
        torch.optim.AdamW(m.critic.parameters(), lr=3e-3, betas=(0.8, 0.95)),
    ]


def _step(m: Toy, opts: list[torch.optim.Optimizer], x: torch.Tensor) -> None:
    m(x).square().mean().backward()
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)


def _trained(steps: int = 2, **kw) -> tuple[Toy, list[torch.optim.Optimizer]]:
    m = Toy(**kw)
    opts = _optimizers(m)
    for _ in range(steps):
        _step(m, opts, torch.randn(6, 5))
    return m, opts


def _exporter(m: torch.nn.Module):
    """``export(dir)`` as a trainer passes it: the module's weights in HF style."""

    def export(out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.contiguous() for k, v in m.state_dict().items()}
        save_file(weights, str(out / "model.safetensors"))

    return export


def _save(root: Path, step: int, m: Toy, opts, keep_last: int = 3, **state) -> Path:
    return save_checkpoint(
        root, step, m, opts, {"step": step, **state}, export=_exporter(m), keep_last=keep_last
    )


def _snapshot(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_same_module(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _assert_same_optimizers(a: Toy, opts_a, b: Toy, opts_b) -> None:
    """Every state tensor (exp_avg, exp_avg_sq, step) and every hyperparameter equal,
    matched through parameter names (the optimizers hold different objects)."""
    params_b = dict(b.named_parameters())
    for i, (oa, ob) in enumerate(zip(opts_a, opts_b)):
        assert len(oa.param_groups) == len(ob.param_groups)
        for ga, gb in zip(oa.param_groups, ob.param_groups):
            assert {k: v for k, v in ga.items() if k != "params"} == {
                k: v for k, v in gb.items() if k != "params"
            }, f"optimizer {i}: param_groups differ"
        assert len(oa.state) == len(ob.state) > 0
        for name, pa in a.named_parameters():
            if pa not in oa.state:
                continue
            sa, sb = oa.state[pa], ob.state[params_b[name]]
            assert sorted(sa) == sorted(sb) == ["exp_avg", "exp_avg_sq", "step"], name
            for key in sa:
                assert sa[key].dtype == sb[key].dtype, (i, name, key)
                assert torch.equal(sa[key], sb[key]), (i, name, key)


# ---------------------------------------------------------------------------------------
# round trip


def test_round_trip_bit_exact_with_two_optimizers(tmp_path):
    a, opts_a = _trained(steps=2)
    saved = _snapshot(a)
    path = _save(tmp_path, 2, a, opts_a, sched={"last_epoch": 2, "lr": 0.5}, name="ppo")
    assert path == tmp_path / "step_00000002"
    assert sorted(p.name for p in path.iterdir()) == [
        "MANIFEST.json",
        "dcp",
        "model",
        "rng",
        "trainer_state.json",
    ]
    assert (path / "dcp" / ".metadata").is_file()
    assert [p.name for p in (path / "rng").iterdir()] == ["rank_00000.json"]

    # a fresh module and fresh optimizers (another init, not stepped), as on resume
    torch.manual_seed(1)
    b = Toy()
    opts_b = _optimizers(b)
    assert not torch.equal(b.policy[0].weight, a.policy[0].weight)
    assert not torch.equal(b.frozen, a.frozen) and not torch.equal(b.scale, a.scale)
    state = load_checkpoint(path, b, opts_b, seed=0, ctx=DistContext())

    expected = {"step": 2, "sched": {"last_epoch": 2, "lr": 0.5}, "name": "ppo", "world_size": 1}
    assert state == expected
    _assert_same_module(a, b)
    assert not b.frozen.requires_grad  # loading copies values, it does not unfreeze
    _assert_same_optimizers(a, opts_a, b, opts_b)
    # the optimizers still drive the module's own parameters: one more step stays equal
    x = torch.randn(6, 5)
    _step(a, opts_a, x)
    _step(b, opts_b, x)
    _assert_same_module(a, b)
    _assert_same_optimizers(a, opts_a, b, opts_b)
    assert not torch.equal(a.policy[0].weight, saved["policy.0.weight"])  # it did step

    # model/ holds what export wrote: the weights at save time
    exported = load_file(str(path / "model" / "model.safetensors"))
    assert exported.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(exported[k], v), k


def test_load_restores_rng_state(tmp_path):
    a, opts = _trained(steps=1)
    path = _save(tmp_path, 1, a, opts)
    expected = _draws()
    b = Toy()
    _scramble_rng(123)
    load_checkpoint(path, b, _optimizers(b), seed=0)  # no ctx: the single-process one
    _assert_same_draws(_draws(), expected)


def _draws() -> tuple[torch.Tensor, float, float]:
    return torch.rand(4), random.random(), float(np.random.rand())  # noqa: NPY002


def _scramble_rng(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002


def _assert_same_draws(got, expected) -> None:
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:], (got, expected)


def _assert_all_differ(got, other) -> None:
    """torch, Python and numpy draws all differ: each generator was (re)seeded."""
    assert not torch.equal(got[0], other[0]) and got[1] != other[1] and got[2] != other[2]


def _edit_trainer_state(ckpt: Path, **changes) -> None:
    """Change the trainer state and re-seal the manifest (a legitimate edit)."""
    state = load_trainer_state(ckpt)
    save_state_json({**state, **changes}, ckpt / "trainer_state.json")
    write_manifest(ckpt)


def _load_draws(ckpt: Path, seed: int, ctx: DistContext, scramble: int) -> tuple:
    """Draws right after loading, from an RNG scrambled beforehand (``scramble``)."""
    m = Toy()
    _scramble_rng(scramble)
    load_checkpoint(ckpt, m, _optimizers(m), seed=seed, ctx=ctx)
    return _draws()


def test_other_world_size_seeds_rng_from_seed_step_rank(tmp_path):
    a, opts = _trained(steps=1)
    path = _save(tmp_path, 5, a, opts)
    continuation = _draws()
    _edit_trainer_state(path, world_size=3)  # written by 3 processes, resumed by 1
    single = DistContext()

    first = _load_draws(path, 7, single, scramble=11)
    _assert_same_draws(_load_draws(path, 7, single, scramble=22), first)  # deterministic
    _assert_all_differ(first, continuation)  # the saved state is not restored
    _assert_all_differ(_load_draws(path, 8, single, scramble=11), first)  # the seed counts
    # rank 1 of 2 (a context without a process group: barriers are no-ops and DCP reads
    # the whole checkpoint, so one process can play that rank) gets its own stream
    rank1 = DistContext(rank=1, world_size=2)
    _assert_all_differ(_load_draws(path, 7, rank1, scramble=11), first)
    _edit_trainer_state(path, step=6)  # and so does the step
    _assert_all_differ(_load_draws(path, 7, single, scramble=11), first)

    # weights still load exactly whatever happens to the RNG
    b = Toy()
    load_checkpoint(path, b, _optimizers(b), seed=7)
    _assert_same_module(a, b)


# ---------------------------------------------------------------------------------------
# pruning, latest, atomicity


def test_keep_last_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    assert checkpoint_dirs(root) == [] and latest_checkpoint(root) is None
    a, opts = _trained(steps=1)
    for step in (1, 2, 3, 10):
        _save(root, step, a, opts, keep_last=2)
    (root / "step_7").mkdir()  # not the step_XXXXXXXX pattern: ignored
    assert [p.name for p in checkpoint_dirs(root)] == ["step_00000003", "step_00000010"]
    assert latest_checkpoint(root) == root / "step_00000010"
    assert load_trainer_state(latest_checkpoint(root))["step"] == 10


class _Killed(BaseException):
    """A kill in the middle of a save (not an Exception: nothing may swallow it)."""


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_export_failure_leaves_previous_checkpoint_intact(tmp_path):
    a, opts = _trained(steps=1)
    first = _save(tmp_path, 1, a, opts)
    before = _tree_digest(first)
    _step(a, opts, torch.randn(6, 5))

    def dies_halfway(out: Path) -> None:
        _exporter(a)(out)
        raise _Killed

    with pytest.raises(_Killed):
        save_checkpoint(tmp_path, 2, a, opts, {"step": 2}, export=dies_halfway, keep_last=1)
    # only the previous checkpoint and an ignored .tmp-* directory; step 1 untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-step_00000002", "step_00000001"]
    assert latest_checkpoint(tmp_path) == first
    assert _tree_digest(first) == before

    second = _save(tmp_path, 2, a, opts, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]
    b = Toy()
    assert load_checkpoint(second, b, _optimizers(b), seed=0)["step"] == 2
    _assert_same_module(a, b)


def test_atomic_write_dir_all_ranks_publishes_atomically(tmp_path):
    final = tmp_path / "out" / "final"
    write = lambda name: lambda d: (d / name).write_text(name)
    assert atomic_write_dir_all_ranks(final, write("a"), ctx=DistContext()) == final
    atomic_write_dir_all_ranks(final, write("b"))
    assert sorted(p.name for p in final.iterdir()) == ["b"]  # replaced, not merged

    def fails(d: Path) -> None:
        (d / "c").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir_all_ranks(final, fails)
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert (final / "b").read_text() == "b"
    assert sorted(p.name for p in final.parent.iterdir()) == [".tmp-final", "final"]
    atomic_write_dir_all_ranks(final, write("d"))
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]
    assert sorted(p.name for p in final.iterdir()) == ["d"]


def test_atomic_write_dir_replaces(tmp_path):
    atomic_write_dir(tmp_path / "final", lambda p: (p / "a").write_text("1"))
    atomic_write_dir(tmp_path / "final", lambda p: (p / "b").write_text("2"))
    assert sorted(x.name for x in (tmp_path / "final").iterdir()) == ["b"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["final"]


# ---------------------------------------------------------------------------------------
# bad input


def test_load_without_dcp_metadata_names_the_directory(tmp_path):
    empty = tmp_path / "step_00000001"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="trainer_state.json: missing"):
        load_checkpoint(empty, Toy(), [], seed=0)
    # an old-format checkpoint: a trainer state but no dcp/ (weights_map.json era)
    torch.save({"step": 1}, empty / "trainer_state.pt")
    with pytest.raises(CheckpointError, match=r"step_00000001/dcp .*no \.metadata"):
        load_checkpoint(empty, Toy(), [], seed=0)


def test_load_into_mismatched_module_raises(tmp_path):
    a, opts = _trained(steps=1)
    path = _save(tmp_path, 1, a, opts)
    # DCP wraps the planner's error in a CheckpointException (a BaseException, which
    # `except Exception` would not catch); read_sharded turns it into a ValueError
    b = Toy(hidden=8)
    with pytest.raises(ValueError, match=r"Size mismatch.*\[7, 5\].*\[8, 5\]"):
        load_checkpoint(path, b, _optimizers(b), seed=0)
    with pytest.raises(
        ValueError, match=r"cannot load .*dcp into this model.*model\.policy\.0\.weight"
    ):
        load_checkpoint(path, b, _optimizers(b), seed=0)
    c = Toy(extra=True)
    with pytest.raises(ValueError, match=r"Missing key .*model\.extra"):
        load_checkpoint(path, c, _optimizers(c), seed=0)


def test_rng_state_round_trip(tmp_path):
    state = rng_state()
    save_state_json(state, tmp_path / "rng.json")
    expected = _draws()
    _scramble_rng(3)
    set_rng_state(load_state_json(tmp_path / "rng.json"))
    _assert_same_draws(_draws(), expected)


# ---------------------------------------------------------------------------------------
# loading never runs code from a file: a payload planted in every file, one at a time


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pristine(tmp_path: Path) -> tuple[Path, Toy, list]:
    a, opts = _trained(steps=1)
    _save(tmp_path / "pristine", 1, a, opts)
    return tmp_path / "pristine" / "step_00000001", a, opts


def _resume(root: Path):
    """What --resume does: pick the checkpoint that verifies, then load it."""
    b = Toy()
    ckpt = resume_checkpoint(root)
    return ckpt, load_checkpoint(ckpt, b, _optimizers(b), seed=0, verify=False)


def _files(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())


def test_payload_in_any_file_is_caught_by_the_manifest(tmp_path):
    pristine, _, _ = _pristine(tmp_path)
    marker = tmp_path / "PWNED"
    files = _files(pristine)
    assert (
        {"MANIFEST.json", "dcp/.metadata", "dcp/__0_0.distcp", "trainer_state.json"} <= set(files)
        and "rng/rank_00000.json" in files
        and "model/model.safetensors" in files
    )
    for rel in files:
        root = tmp_path / f"run_{rel.replace('/', '_')}"
        shutil.copytree(pristine, root / pristine.name)
        (root / pristine.name / rel).write_bytes(pickle.dumps(Payload(marker)))
        with pytest.raises(CheckpointError) as err:
            _resume(root)
        assert rel in str(err.value), (rel, str(err.value))
        assert "\n" not in str(err.value)
        assert not marker.exists(), rel
        # nothing verifies: nothing is moved (a later --resume must not start fresh)
        assert _files(root / pristine.name) == files


def _reseal(ckpt: Path) -> None:
    """The attacker rewrites the manifest too: only the loaders stand in the way."""
    write_manifest(ckpt)


def _stock_dcp_with(ckpt: Path, m: Toy, opts, marker: Path) -> None:
    """dcp/ rewritten by torch's stock DCP with a payload as an optimizer hyperparameter
    (stock DCP pickles non-tensor entries and unpickles them with weights_only=False)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(m, opts)
    optim_sd["param_groups"][0]["lr"] = Payload(marker)
    shutil.rmtree(ckpt / "dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt / "dcp"), no_dist=True
        )


def _metadata_with(ckpt: Path, marker: Path) -> None:
    """dcp/.metadata: the real metadata with a payload inside (stock DCP: plain pickle)."""
    path = ckpt / "dcp" / ".metadata"
    with open(path, "rb") as f:
        md = pickle.load(f)  # our own, just-written file
    md.planner_data = {"x": Payload(marker)}
    path.write_bytes(pickle.dumps(md))


@pytest.mark.parametrize(
    "rel", ["dcp/.metadata", "dcp/__0_0.distcp", "trainer_state.json", "rng/rank_00000.json"]
)
def test_payload_behind_a_forged_manifest_never_runs(tmp_path, rel):
    pristine, a, opts = _pristine(tmp_path)
    marker = tmp_path / "PWNED"
    root = tmp_path / "run"
    ckpt = root / pristine.name
    shutil.copytree(pristine, ckpt)
    if rel == "dcp/.metadata":
        _metadata_with(ckpt, marker)
    elif rel == "dcp/__0_0.distcp":
        _stock_dcp_with(ckpt, a, opts, marker)
    else:
        (ckpt / rel).write_bytes(pickle.dumps(Payload(marker)))
    _reseal(ckpt)
    with pytest.raises(CheckpointError) as err:
        _resume(root)
    assert rel in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("rel", ["model/model.safetensors", "model/config.json"])
def test_files_resume_does_not_read_stay_unread(tmp_path, rel):
    pristine, a, _ = _pristine(tmp_path)
    marker = tmp_path / "PWNED"
    root = tmp_path / "run"
    shutil.copytree(pristine, root / pristine.name)
    (root / pristine.name / rel).write_bytes(pickle.dumps(Payload(marker)))
    _reseal(root / pristine.name)
    _, state = _resume(root)
    assert state["step"] == 1 and not marker.exists()


def _legacy(ckpt: Path) -> None:
    """The format before manifests: trainer_state.pt and rng/*.pt (torch.save)."""
    torch.save(load_state_json(ckpt / "trainer_state.json"), ckpt / "trainer_state.pt")
    rng = load_state_json(ckpt / "rng" / "rank_00000.json")
    torch.save(rng, ckpt / "rng" / "rank_00000.pt")
    for rel in ("trainer_state.json", "rng/rank_00000.json", "MANIFEST.json"):
        (ckpt / rel).unlink()


def test_legacy_checkpoint_loads_with_a_note_and_refuses_payloads(tmp_path, capsys):
    pristine, a, _ = _pristine(tmp_path)
    root = tmp_path / "legacy"
    shutil.copytree(pristine, root / pristine.name)
    _legacy(root / pristine.name)
    b = Toy()
    ckpt = resume_checkpoint(root)
    load_checkpoint(ckpt, b, _optimizers(b), seed=0, verify=False)
    _assert_same_module(a, b)
    out = capsys.readouterr().out
    assert "no MANIFEST.json" in out and out.count("\n") == 1
    marker = tmp_path / "PWNED"
    for rel in ("trainer_state.pt", "rng/rank_00000.pt"):
        bad = tmp_path / f"bad_{rel.replace('/', '_')}"
        shutil.copytree(root, bad)
        torch.save({"torch": Payload(marker), "step": 1}, bad / pristine.name / rel)
        with pytest.raises(CheckpointError, match=re.escape(rel)):
            _resume(bad)
        assert not marker.exists()


def test_corrupt_latest_falls_back_to_the_previous_one(tmp_path, capsys):
    a, opts = _trained(steps=1)
    root = tmp_path / "ck"
    _save(root, 1, a, opts)
    before = _tree_digest(root / "step_00000001")
    _step(a, opts, torch.randn(6, 5))
    _save(root, 2, a, opts)
    shard = root / "step_00000002" / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    ckpt, state = _resume(root)
    assert ckpt == root / "step_00000001" and state["step"] == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step_00000002" in err[0] and "__0_0.distcp" in err[0], err
    assert _tree_digest(root / "step_00000001") == before
    # kept aside, never deleted, and out of the way of the next save of step 2 / pruning
    assert (root / "rejected-step_00000002" / "dcp" / "__0_0.distcp").read_bytes() == data
    _save(root, 2, a, opts, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["rejected-step_00000002", "step_00000002"]


def test_truncated_metadata_and_tensor_file_name_the_file(tmp_path):
    pristine, _, _ = _pristine(tmp_path)
    for rel in ("dcp/.metadata", "dcp/__0_0.distcp", "trainer_state.json"):
        root = tmp_path / f"t_{rel.replace('/', '_')}"
        ckpt = root / pristine.name
        shutil.copytree(pristine, ckpt)
        data = (ckpt / rel).read_bytes()
        (ckpt / rel).write_bytes(data[: len(data) // 2])
        _reseal(ckpt)  # past the manifest: the loaders themselves report the file
        with pytest.raises(CheckpointError, match=re.escape(rel)):
            _resume(root)


def _rng_of_wrong_size(ckpt: Path) -> None:
    state = load_state_json(ckpt / "rng" / "rank_00000.json")
    state["torch"] = state["torch"][:3]
    save_state_json(state, ckpt / "rng" / "rank_00000.json")


def _metadata_path_escape(ckpt: Path) -> None:
    path = ckpt / "dcp" / ".metadata"
    with open(path, "rb") as f:
        md = pickle.load(f)  # our own, just-written file
    next(iter(md.storage_data.values())).relative_path = "../trainer_state.json"
    path.write_bytes(pickle.dumps(md))


@pytest.mark.parametrize(
    "rel,damage,match",
    [
        ("rng/rank_00000.json", _rng_of_wrong_size, "not a usable RNG state"),
        ("trainer_state.json", '{"step": "1"}', "no integer 'step'"),
        ("trainer_state.json", "[" * 5000 + "]" * 5000, "not a JSON state file"),
        ("trainer_state.json", '{"step": 1, "x": [' * 400 + "1" + "]}" * 400, "nested"),
        (
            "trainer_state.json",
            '{"step": 1, "x": {"__tensor__": {"dtype": "object", "shape": [1], "data": ""}}}',
            "malformed tensor entry",
        ),
        (
            "trainer_state.json",
            '{"step": 1, "x": {"__tensor__": {"dtype": "int64", "shape": [4], "data": "AAAA"}}}',
            "tensor data is 3 bytes",
        ),
        ("dcp/.metadata", _metadata_path_escape, "bad storage entry"),
    ],
    ids=["rng-size", "step-type", "json-depth", "state-depth", "dtype", "data-size", "path"],
)
def test_malformed_state_behind_a_forged_manifest_names_the_file(tmp_path, rel, damage, match):
    pristine, _, _ = _pristine(tmp_path)
    root = tmp_path / "run"
    ckpt = root / pristine.name
    shutil.copytree(pristine, ckpt)
    if callable(damage):
        damage(ckpt)
    else:
        (ckpt / rel).write_text(damage)
    _reseal(ckpt)
    with pytest.raises(CheckpointError, match=match) as err:
        _resume(root)
    assert rel in str(err.value) and "\n" not in str(err.value)


def test_stock_dcp_files_load_exactly_without_torch_load(tmp_path, monkeypatch):
    """dcp/ written by torch's stock DCP (pickled hyperparameters, torch.save'd tensors,
    as before this format) loads bit-exactly, and torch.load is never called."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    a, opts = _trained(steps=2)
    root = tmp_path / "run"
    ckpt = _save(root, 2, a, opts)
    model_sd, optim_sd = get_state_dict(a, opts)
    shutil.rmtree(ckpt / "dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt / "dcp"), no_dist=True
        )
    _reseal(ckpt)

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load called while loading a checkpoint")

    monkeypatch.setattr(torch, "load", no_torch_load)
    b = Toy()
    opts_b = _optimizers(b)
    load_checkpoint(ckpt, b, opts_b, seed=0)
    _assert_same_module(a, b)
    _assert_same_optimizers(a, opts, b, opts_b)


# ---------------------------------------------------------------------------------------
# torch.save archives decoded without unpickling (fastrlhf.distributed.tensor_file)


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "t",
    [
        torch.randn(3, 4),
        torch.tensor(5.0),
        torch.randn(4, 3).t(),  # strided
        torch.arange(10)[2:5],  # offset into a larger storage
        torch.randn(5, 5)[::2, 1:],
        torch.zeros(0, 3, dtype=torch.bfloat16),
        torch.randn(2, 3).to(torch.bfloat16),
        torch.tensor([True, False]),
        torch.randint(0, 255, (7,), dtype=torch.uint8),
        torch.randn(3, dtype=torch.complex64),
        torch.randn(2, requires_grad=True),
    ],
)
def test_read_saved_tensor_is_exact(t):
    got = read_saved_tensor(_saved(t))
    assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t.detach())


def test_read_saved_plain_and_nested():
    for v in [1e-3, (0.9, 0.95), True, None, ["a.b", "c"], {"x": 1, 2: [1.5]}, 10**30, -3]:
        got = read_saved_plain(_saved(v))
        assert got == v and type(got) is type(v)
    state = {"step": 3, "t": torch.arange(4), "py": (3, tuple(range(5)), None)}
    got = read_saved(_saved(state))
    assert got["step"] == 3 and got["py"] == state["py"] and torch.equal(got["t"], state["t"])
    with pytest.raises(ValueError, match="a tensor where plain data"):
        read_saved_plain(_saved([torch.ones(1)]))


def test_read_saved_refuses_code_and_bad_archives(tmp_path):
    marker = tmp_path / "PWNED"
    for obj in (Payload(marker), {"x": Payload(marker)}, [torch.ones(2), Payload(marker)]):
        with pytest.raises(ValueError):
            read_saved(_saved(obj))
    with pytest.raises(ValueError):
        read_saved(pickle.dumps(Payload(marker)))  # a bare pickle, not an archive
    assert not marker.exists()
    raw = _saved(torch.arange(6, dtype=torch.float32))
    with pytest.raises(ValueError):  # truncated archive
        read_saved(raw[: len(raw) // 2])
    # a rebuild whose size reaches past its storage
    archive = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name in archive.namelist():
            data = archive.read(name)
            if name.endswith("data.pkl"):
                data = data.replace(b"K\x06\x85", b"K\x07\x85")  # size (6,) -> (7,)
            z.writestr(name, data)
    with pytest.raises(ValueError, match="past its storage"):
        read_saved_tensor(out.getvalue())
    # compressed members are refused (no decompression bombs)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name in archive.namelist():
            z.writestr(name, archive.read(name))
    with pytest.raises(ValueError, match="compressed"):
        read_saved_tensor(out.getvalue())
